"""The multi-precision MatQuant training objective, shared by both training routes (`--method qat`, end to end,
and `--method omniquant`, block-wise): which slices r ∈ R are trained, their weights λ_r, and co-distillation,
parsed and validated before any work starts. This is the only parser of `--bits-list` / `--lambdas` / `--distill`
for the training methods.

Paper notation (MatQuant, Nair et al. 2025, §5 co-distillation), accepted by `parse_distill` / `--distill`:

    [8,4,2]          ground-truth cross-entropy on the int8, int4 and int2 slices (no distillation)
    [8,4,8->2]       int8, int4 on ground truth; int2 learns ONLY from the int8 slice's output (teacher)
    [8,4,2,8->2]     int2 learns from ground truth AND from the int8 teacher, at equal weight
    [8,4,2,8->4;2]   int4 and int2 each learn from ground truth and from the int8 teacher

A bare number is a ground-truth term; `t->a;b` makes slice t the teacher of slices a and b (`→` is accepted
for `->`). The teacher's output is detached (stop-gradient). The loss of slice r is

    L_r = CE(r)                               ground truth only
    L_r = KD(t → r)                           teacher only
    L_r = (CE(r) + KD(t → r)) / 2             both, at equal weight (so λ_r stays the total weight of slice r)

with (QAT) CE the next-token cross-entropy and KD the soft cross-entropy −Σ softmax(teacher)·log softmax(student)
per token, or (OmniQuant) both the relative MSE of the block output to the fp block output / the int-t slice's
block output; the total loss is Σ_r λ_r · L_r. Each λ_r must be > 0 (a slice with no weight is not trained: drop
it from R instead). Single-Precision MatQuant is R = {2} with an int8 master (`bits=[2]`, master 8); Extra-Precision
MatQuant is slicing mode 'extra'; a dedicated baseline is R = {c} with master bits c.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from matquant.quant.minmax import check_bits
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing

# The paper's λ for R = (8, 4, 2) (Nair et al. 2025, Tables 1-2).
PAPER_LAMBDAS = {(8, 4, 2): (0.1, 0.1, 1.0)}


@dataclass(frozen=True)
class Term:
    """The loss of one trained slice: ground truth, a teacher slice, or both."""

    bits: int
    weight: float  # λ_r
    ground_truth: bool
    teacher: int | None = None  # bits of the teacher slice (stop-gradient), or None


@dataclass(frozen=True)
class Objective:
    terms: tuple[Term, ...]  # in descending bits (teachers come first)
    master_bits: int
    slicing: str

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(t.bits for t in self.terms)

    @property
    def lambdas(self) -> tuple[float, ...]:
        return tuple(t.weight for t in self.terms)

    @property
    def teachers(self) -> tuple[int, ...]:
        """Teacher slices, each computed once per batch (descending)."""
        return tuple(sorted({t.teacher for t in self.terms if t.teacher is not None}, reverse=True))

    @property
    def students(self) -> tuple[int, ...]:
        """The trained slices (descending); same as `bits`."""
        return self.bits

    def sources(self, bits: int) -> tuple:
        """What slice `bits` learns from, in loss order: 'fp' (ground truth / full-precision output) and/or the
        teacher slice's bits."""
        t = next(t for t in self.terms if t.bits == bits)
        return (("fp",) if t.ground_truth else ()) + ((t.teacher,) if t.teacher is not None else ())

    def needed(self) -> tuple[int, ...]:
        """Every slice whose output a step needs: the trained ones and their teachers (descending)."""
        return tuple(sorted(set(self.bits) | set(self.teachers), reverse=True))

    def notation(self) -> str:
        """The objective in the paper's bracket notation, e.g. '[8,4,2,8->2]'."""
        parts = [str(t.bits) for t in self.terms if t.ground_truth]
        for tb in self.teachers:
            parts.append(f"{tb}->" + ";".join(str(t.bits) for t in self.terms if t.teacher == tb))
        return "[" + ",".join(parts) + "]"

    def describe(self) -> str:
        lam = ", ".join(f"int{t.bits}: {t.weight:g}" for t in self.terms)
        return f"{self.notation()} λ=({lam}), master int{self.master_bits}, slicing {self.slicing}"

    def to_dict(self) -> dict:
        return {"terms": [asdict(t) for t in self.terms], "master_bits": self.master_bits, "slicing": self.slicing,
                "notation": self.notation()}


def parse_int_list(spec, what: str = "--bits-list") -> list[int]:
    if isinstance(spec, str):
        try:  # an empty item (or spec) fails int() too
            vals = [int(x.strip()) for x in spec.strip().strip("[]").split(",")]
        except ValueError:
            raise ValueError(f"{what} {spec!r} is not a comma-separated list of bit-widths like 8,4,2.") from None
    else:
        vals = list(spec)
    for v in vals:
        check_bits(v, f"{what} entry")
    return vals


def parse_lambdas(spec, n: int | None = None) -> list[float]:
    if isinstance(spec, str):
        try:
            vals = [float(x) for x in spec.strip().strip("[]()").split(",")]
        except ValueError:
            raise ValueError(f"--lambdas {spec!r} is not a comma-separated list of positive numbers like "
                             "0.1,0.1,1.") from None
    else:
        vals = [float(x) for x in spec]
    bad = [v for v in vals if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"--lambdas must all be positive finite numbers, got {bad}.")
    if n is not None and len(vals) != n:
        raise ValueError(f"--lambdas has {len(vals)} value(s) but {n} bit-width(s) are trained; give one λ per "
                         "bit-width, in the same order.")
    return vals


_ITEM_DISTILL = re.compile(r"^(\d+)->(\d+(?:;\d+)*)$")


def parse_distill(spec: str) -> tuple[list[int], dict[int, int]]:
    """'[8,4,2,8->4;2]' -> (ground-truth bits [8, 4, 2], {student bits: teacher bits} {4: 8, 2: 8})."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--distill needs a spec in the paper's notation, e.g. '[8,4,2]', '[8,4,8->2]', "
                         "'[8,4,2,8->4;2]'.")
    s = spec.replace("→", "->").replace(" ", "")
    if not (s.startswith("[") and s.endswith("]")) or len(s) < 3:
        raise ValueError(f"--distill {spec!r}: expected brackets, e.g. '[8,4,2,8->2]'.")
    gt: list[int] = []
    students: dict[int, int] = {}
    for item in s[1:-1].split(","):
        m = _ITEM_DISTILL.match(item)
        if m:
            teacher = int(m.group(1))
            check_bits(teacher, f"--distill {spec!r}: teacher bits")
            for st in (int(x) for x in m.group(2).split(";")):
                check_bits(st, f"--distill {spec!r}: student bits")
                if st >= teacher:
                    raise ValueError(f"--distill {spec!r}: teacher int{teacher} must have more bits than its student "
                                     f"int{st}.")
                if st in students:
                    raise ValueError(f"--distill {spec!r}: int{st} has more than one teacher.")
                students[st] = teacher
        elif item.isdigit():
            b = int(item)
            check_bits(b, f"--distill {spec!r}: bits")
            if b in gt:
                raise ValueError(f"--distill {spec!r}: int{b} is listed twice.")
            gt.append(b)
        else:
            raise ValueError(f"--distill {spec!r}: cannot read {item!r}; items are bit-widths (8) or teacher->students "
                             "(8->4;2).")
    return gt, students


def default_lambdas(bits: list[int]) -> list[float]:
    """The paper's (0.1, 0.1, 1.0) for (8, 4, 2); otherwise 1.0 on the lowest bit-width and 0.1 on the others."""
    if tuple(bits) in PAPER_LAMBDAS:
        return list(PAPER_LAMBDAS[tuple(bits)])
    low = min(bits)
    return [1.0 if b == low else 0.1 for b in bits]


def build_objective(bits=None, lambdas=None, distill: str | None = None, *, master_bits: int = 8,
                    slicing: str = DEFAULT_SLICING) -> Objective:
    """Validate and assemble the objective. `bits` (R), `lambdas` (one per r, same order) and `distill` (paper
    notation) may be strings or lists; with `distill` alone R is read from it; with both they must agree."""
    check_bits(master_bits, "master bits")
    check_slicing(slicing)
    gt, students = (None, {}) if distill is None else parse_distill(distill)
    if bits is not None:
        bits = parse_int_list(bits)
        if len(set(bits)) != len(bits):
            raise ValueError(f"--bits-list {bits} lists a bit-width twice.")
    if gt is not None:
        spec_bits = sorted(set(gt) | set(students), reverse=True)
        if bits is not None and sorted(bits, reverse=True) != spec_bits:
            raise ValueError(f"--bits-list {bits} and --distill {distill!r} disagree: the spec trains {spec_bits}. "
                             "Give one of them, or make them list the same bit-widths.")
        if bits is None:
            bits = spec_bits
    if bits is None:
        bits = [8, 4, 2] if master_bits == 8 else [master_bits]
    if not bits:
        raise ValueError("--bits-list must name at least one bit-width.")
    too_big = [b for b in bits if b > master_bits]
    if too_big:
        raise ValueError(f"cannot train int{too_big[0]} slices of an int{master_bits} master: every trained "
                         f"bit-width must be <= --bits-master ({master_bits}).")
    for st, t in students.items():
        if t > master_bits:
            raise ValueError(f"--distill teacher int{t} exceeds --bits-master {master_bits}.")
    lam = default_lambdas(bits) if lambdas is None else parse_lambdas(lambdas, len(bits))
    lam_of = dict(zip(bits, lam))
    gt_set = set(bits) if gt is None else set(gt)
    terms = tuple(Term(bits=b, weight=lam_of[b], ground_truth=b in gt_set, teacher=students.get(b))
                  for b in sorted(bits, reverse=True))
    return Objective(terms=terms, master_bits=master_bits, slicing=slicing)


__all__ = ["Term", "Objective", "build_objective", "parse_distill", "parse_int_list", "parse_lambdas",
           "default_lambdas", "PAPER_LAMBDAS"]
