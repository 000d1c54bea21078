"""Multi-precision objective: R, λ, co-distillation specs (paper notation), S.P., E.P., dedicated; bad specs."""
import pytest

from matquant.algorithms.training.objective import build_objective, parse_distill
from matquant.cli import main


def _terms(obj):
    return [(t.bits, t.weight, t.ground_truth, t.teacher) for t in obj.terms]


def test_default_is_paper_842():
    obj = build_objective()
    assert _terms(obj) == [(8, 0.1, True, None), (4, 0.1, True, None), (2, 1.0, True, None)]
    assert obj.notation() == "[8,4,2]"


@pytest.mark.parametrize("spec,expected", [
    ("[8,4,2]", [(8, True, None), (4, True, None), (2, True, None)]),
    ("[8,4,8->2]", [(8, True, None), (4, True, None), (2, False, 8)]),
    ("[8,4,2,8->2]", [(8, True, None), (4, True, None), (2, True, 8)]),
    ("[8,4,2,8->4;2]", [(8, True, None), (4, True, 8), (2, True, 8)]),
    ("[8, 4, 2, 8→2]", [(8, True, None), (4, True, None), (2, True, 8)]),
])
def test_distill_specs(spec, expected):
    obj = build_objective(distill=spec)
    assert [(t.bits, t.ground_truth, t.teacher) for t in obj.terms] == expected
    assert obj.lambdas == (0.1, 0.1, 1.0)
    assert build_objective(distill=obj.notation()) == obj  # notation round-trips


def test_bits_lambdas_variants():
    obj = build_objective("8,4,3,2", "0.1,0.1,0.5,1")
    assert obj.bits == (8, 4, 3, 2) and obj.lambdas == (0.1, 0.1, 0.5, 1.0)
    assert build_objective("8,4,3,2").lambdas == (0.1, 0.1, 0.1, 1.0)
    # λ follows the order the bits were given in
    assert build_objective("2,8,4", "1,0.2,0.3").lambdas == (0.2, 0.3, 1.0)
    sp = build_objective("2", master_bits=8)  # Single-Precision MatQuant
    assert sp.bits == (2,) and sp.master_bits == 8 and sp.lambdas == (1.0,)
    ep = build_objective("8,4,2", slicing="extra")  # Extra-Precision MatQuant
    assert ep.slicing == "extra"
    ded = build_objective("2", master_bits=2)  # dedicated int2 baseline
    assert ded.bits == (2,) and ded.master_bits == 2
    assert build_objective(master_bits=4).bits == (4,)
    assert build_objective("8,4,2", distill="[8,4,8->2]").terms[-1].teacher == 8  # consistent: fine
    # a teacher that is not trained itself
    obj = build_objective(distill="[4,2,8->2]")
    assert obj.bits == (4, 2) and obj.teachers == (8,)


@pytest.mark.parametrize("kw,msg", [
    (dict(bits="8,4,9"), "1..8"),
    (dict(bits="8,4,4"), "twice"),
    (dict(bits="8,4,x"), "comma-separated"),
    (dict(bits="8,,2"), "comma-separated"),
    (dict(bits="8,4,2", lambdas="1,1"), "one λ per bit-width"),
    (dict(bits="8,4,2", lambdas="1,0,1"), "positive"),
    (dict(bits="8,4,2", lambdas="1,-1,1"), "positive"),
    (dict(bits="8,4,2", lambdas="1,nan,1"), "positive"),
    (dict(bits="8,4,2", lambdas="a,b,c"), "positive numbers"),
    (dict(bits="8,4,2", master_bits=4), "<= --bits-master"),
    (dict(distill="8,4,2"), "brackets"),
    (dict(distill="[]"), "brackets"),
    (dict(distill="[8,4,2->8]"), "more bits than its student"),
    (dict(distill="[8,4,x]"), "cannot read"),
    (dict(distill="[8,8,2]"), "twice"),
    (dict(distill="[8,4,2,8->2,4->2]"), "more than one teacher"),
    (dict(distill="[8,4,2,9->2]"), "1..8"),
    (dict(bits="8,4,3", distill="[8,4,2]"), "disagree"),
    (dict(distill="[4,2,8->2]", master_bits=4), "exceeds --bits-master"),
])
def test_bad_specs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_objective(kw.get("bits"), kw.get("lambdas"), kw.get("distill"), master_bits=kw.get("master_bits", 8))


def test_parse_distill_direct():
    assert parse_distill("[8,4,2,8->4;2]") == ([8, 4, 2], {4: 8, 2: 8})


@pytest.mark.parametrize("extra,msg", [
    (["--distill", "[8,4,2->8]"], "more bits than its student"),
    (["--lambdas", "1,2"], "one λ per bit-width"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
])
def test_cli_rejects_bad_specs_before_loading(tmp_path, capsys, extra, msg):
    # the model path does not exist: the spec error must come first (before any loading/training work)
    rc = main(["quantize", "--method", "qat", "--model", str(tmp_path / "no-such-model"), "--out",
               str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 1 and msg in err and "no-such-model" not in err
