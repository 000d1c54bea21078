from matquant.format.config import FORMAT_VERSION, CheckpointError, QuantConfig
from matquant.format.checkpoint import load_checkpoint, read_quant_config, save_checkpoint

__all__ = ["FORMAT_VERSION", "CheckpointError", "QuantConfig", "load_checkpoint", "read_quant_config",
           "save_checkpoint"]
