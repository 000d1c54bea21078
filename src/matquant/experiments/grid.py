"""Experiment grids: a YAML file expanded into measurements (see docs/experiments.md for the full schema).

A grid crosses models × methods (each with its own args: λ, learning rate, ...) × scopes × slicing variants and
evaluates every requested precision (plus optional Mix'n'Match schedules and saved checkpoints) with perplexity
and/or zero-shot accuracy. Every measurement is identified by its config (a JSON dict); its hash is the key in
the results store, so a re-run skips what is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matquant.quant.slicing import SLICING_MODES

EVAL_KINDS = ("ppl", "zeroshot")
KNOWN_KEYS = {"name", "out", "store", "docs", "models", "model", "methods", "scopes", "scope", "slicing", "bits",
              "master_bits", "group_size", "symmetric", "param_dtype", "baseline", "mixnmatch", "checkpoints",
              "calib", "eval", "device", "threads"}
PPL_DEFAULTS = {"text": "eval", "windows": 16, "seqlen": 2048, "batch_size": 1}
ZS_DEFAULTS = {"tasks": None, "limit": "default", "batch_size": 8}
# calibration: text (default the embedded 'calib'), windows and seqlen (default: the method's, from its config),
# offset (windows of the text skipped before the calibration windows; default 0, not recorded)
CALIB_KEYS = {"text", "windows", "seqlen", "offset"}
LAYOUT_KEYS = ("master_bits", "group_size", "symmetric", "param_dtype", "scope", "slicing")
RUN_ONLY_KEYS = ("batch_size",)  # settings that do not change a result: kept out of the config key


class GridError(ValueError):
    """The grid file is malformed."""


@dataclass
class QuantJob:
    """One quantized model (or the fp32 reference, or a saved checkpoint) and the evaluations to run on it."""
    model: str
    quant: dict | None  # None: the fp32 reference; {"checkpoint": path, ...}: a saved checkpoint
    evals: list[dict] = field(default_factory=list)  # each: a full measurement config


@dataclass
class Grid:
    name: str
    out: Path
    store: Path
    docs: Path | None
    jobs: list[QuantJob]
    ppl: dict | None
    zeroshot: dict | None
    calib: dict
    device: str
    threads: int | None
    raw: dict


def _as_list(x, what: str) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def load_grid(path) -> Grid:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise GridError(f"grid file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise GridError(f"grid file {path} must be a YAML mapping (see docs/experiments.md).")
    return parse_grid(raw, default_name=p.stem)


def parse_grid(raw: dict, default_name: str = "grid") -> Grid:
    from matquant.algorithms import METHOD_CONFIGS, make_config
    from matquant.eval.zeroshot_tasks import DEFAULT_TASKS, check_tasks
    from matquant.models.targets import SCOPES

    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise GridError(f"unknown grid key(s) {unknown}; allowed: {', '.join(sorted(KNOWN_KEYS))}.")
    name = str(raw.get("name", default_name))
    out = Path(raw.get("out", f"runs/{name}"))
    store = Path(raw.get("store", out / "results.jsonl"))
    docs = Path(raw["docs"]) if raw.get("docs") else None
    models = _as_list(raw.get("models", raw.get("model", "smollm2-135m")), "models")
    scopes = _as_list(raw.get("scopes", raw.get("scope", "ffn")), "scopes")
    for s in scopes:
        if s not in SCOPES:
            raise GridError(f"unknown scope {s!r}; choose among {', '.join(SCOPES)}.")
    slicings = _as_list(raw.get("slicing", ["paper", "nested"]), "slicing")
    for s in slicings:
        if s not in SLICING_MODES:
            raise GridError(f"unknown slicing {s!r}; choose among {', '.join(SLICING_MODES)}.")
    master = int(raw.get("master_bits", 8))
    bits = [int(b) for b in _as_list(raw.get("bits", [8, 6, 4, 3, 2]), "bits")]
    bad = [b for b in bits if not 1 <= b <= master]
    if bad:
        raise GridError(f"bits {bad} are outside 1..master_bits ({master}).")
    methods = []
    for m in _as_list(raw.get("methods", ["rtn"]), "methods"):
        m = {"name": m} if isinstance(m, str) else dict(m)
        if "name" not in m:
            raise GridError(f"method entry {m} has no name.")
        if m["name"] not in METHOD_CONFIGS:
            raise GridError(f"unknown method {m['name']!r}; registered: {', '.join(sorted(METHOD_CONFIGS))}.")
        extra = sorted(set(m) - {"name", "args", "label", "master_bits", "bits", "calib"})
        if extra:
            raise GridError(f"method entry {m['name']!r} has unknown key(s) {extra}; use name, label, args, "
                            "master_bits, bits, calib.")
        if "calib" in m and (not isinstance(m["calib"], dict) or set(m["calib"]) - CALIB_KEYS):
            raise GridError(f"method entry {m['name']!r}: calib must map some of {sorted(CALIB_KEYS)} to values "
                            f"(this method's calibration, over the grid's), got {m['calib']!r}.")
        m.setdefault("args", {})
        m.setdefault("label", m["name"])
        # a dedicated model per bit-width in the same grid: {name: gptq, master_bits: 4, bits: [4]}
        m["master_bits"] = int(m.get("master_bits", master))
        m["bits"] = [int(b) for b in _as_list(m.get("bits", [b for b in bits if b <= m["master_bits"]]), "bits")]
        bad = [b for b in m["bits"] if not 1 <= b <= m["master_bits"]]
        if bad or not m["bits"]:
            raise GridError(f"method entry {m['label']!r}: bits {bad or '[]'} are outside 1..master_bits "
                            f"({m['master_bits']}).")
        methods.append(m)
    ev = raw.get("eval", {"ppl": {}})
    if not isinstance(ev, dict) or not ev or set(ev) - set(EVAL_KINDS):
        raise GridError(f"eval must map one or more of {EVAL_KINDS} to their settings, got {ev!r}.")
    ppl = {**PPL_DEFAULTS, **(ev["ppl"] or {})} if "ppl" in ev else None
    zs = None
    if "zeroshot" in ev:
        zs = {**ZS_DEFAULTS, **(ev["zeroshot"] or {})}
        zs["tasks"] = check_tasks(zs["tasks"] or list(DEFAULT_TASKS))
    device = str(raw.get("device", "cpu"))
    if zs is not None and zs["limit"] == "default":
        from matquant.eval.zeroshot import default_limit

        zs["limit"] = default_limit(device)
    calib = {"text": "calib", **(raw.get("calib") or {})}
    if set(calib) - CALIB_KEYS:
        raise GridError(f"calib has unknown key(s) {sorted(set(calib) - CALIB_KEYS)}; use {', '.join(sorted(CALIB_KEYS))}.")
    for c in [calib] + [m["calib"] for m in methods if "calib" in m]:
        off = c.get("offset", 0)
        if not isinstance(off, int) or isinstance(off, bool) or off < 0:
            raise GridError(f"calib offset must be a non-negative integer (windows of the text to skip), got {off!r}.")
    common = {"master_bits": master, "group_size": int(raw.get("group_size", 64)),
              "symmetric": bool(raw.get("symmetric", False)), "param_dtype": str(raw.get("param_dtype", "float16"))}
    evals = [(k, s) for k, s in (("ppl", ppl), ("zeroshot", zs)) if s is not None]

    def measurement(model, kind, settings, quant, bits):
        return {"model": model, "eval": kind, **{k: v for k, v in settings.items() if k not in RUN_ONLY_KEYS},
                "quant": quant, "bits": bits}

    jobs: list[QuantJob] = []
    for model in models:
        if raw.get("baseline", True):
            jobs.append(QuantJob(model, None, [measurement(model, k, s, None, "fp32") for k, s in evals]))
        for scope in scopes:
            for m in methods:
                for sl in slicings:
                    quant = {"method": m["name"], "label": m["label"], "args": m["args"], "scope": scope,
                             "slicing": sl, **common, "master_bits": m["master_bits"]}
                    try:
                        config = make_config(m["name"], **{k: v for k, v in quant.items() if k in LAYOUT_KEYS},
                                             **m["args"])
                    except (ValueError, TypeError) as e:
                        raise GridError(f"method entry {m['label']!r}: {e}") from None
                    if config.needs_calibration():
                        n, seqlen = config.calib_defaults
                        quant["calib"] = {"windows": n, "seqlen": seqlen, **calib, **m.get("calib", {})}
                    ms = [measurement(model, k, s, quant, b) for b in m["bits"] for k, s in evals]
                    for mm in _as_list(raw.get("mixnmatch"), "mixnmatch"):
                        ms += [measurement(model, k, s, quant, _mixnmatch_spec(mm)) for k, s in evals]
                    jobs.append(QuantJob(model, quant, ms))
        for ck in _as_list(raw.get("checkpoints"), "checkpoints"):
            ck = {"path": ck} if isinstance(ck, str) else dict(ck)
            if ck.get("model", models[0]) != model:
                continue
            quant = {"checkpoint": str(ck["path"]), "label": ck.get("label", Path(ck["path"]).name)}
            cbits = [int(b) for b in _as_list(ck.get("bits", bits), "bits")]
            for sl in _as_list(ck.get("slicing", slicings), "slicing"):
                q = dict(quant, slicing=sl)
                jobs.append(QuantJob(model, q, [measurement(model, k, s, q, b) for b in cbits for k, s in evals]))
    return Grid(name=name, out=out, store=store, docs=docs, jobs=jobs, ppl=ppl, zeroshot=zs, calib=calib,
                device=device, threads=raw.get("threads"), raw=raw)


def _mixnmatch_spec(mm: Any) -> dict:
    from matquant.mixnmatch import DEFAULT_LADDER, SCHEDULES, resolve_floor

    if not isinstance(mm, dict) or "schedule" not in mm or "target" not in mm:
        raise GridError(f"mixnmatch entries need schedule and target, e.g. {{schedule: pyramid, target: 3.0}}; "
                        f"got {mm!r}.")
    if mm["schedule"] not in SCHEDULES:
        raise GridError(f"unknown Mix'n'Match schedule {mm['schedule']!r}; choose among {', '.join(SCHEDULES)}.")
    unknown = set(mm) - {"schedule", "target", "ladder", "floor"}
    if unknown:
        raise GridError(f"unknown key(s) {sorted(unknown)} in mixnmatch entry {mm!r}; allowed: schedule, target, "
                        f"ladder, floor.")
    ladder = [int(x) for x in mm.get("ladder", DEFAULT_LADDER)]
    floor = mm.get("floor", "auto")
    try:
        resolve_floor(float(mm["target"]), ladder, floor)
    except ValueError as e:
        raise GridError(f"mixnmatch entry {mm!r}: {e}") from None
    return {"schedule": mm["schedule"], "target": float(mm["target"]), "ladder": ladder, "floor": floor}
