from matquant.data.text import SPLITS, calib_passages, eval_passages, get_text, token_windows

__all__ = ["SPLITS", "calib_passages", "eval_passages", "get_text", "token_windows"]
