"""The lab's two machine settings, in one place: the work folder and llama.cpp's binaries.

- Work folder: where benchmarks and scripts put checkpoints, exports, scratch files and their default result
  files. ``--work DIR`` where a script has options, else the environment variable ``MATQUANT_WORK``, else
  ``./matquant-work`` (relative to the current directory).
- llama.cpp: ``llama-quantize``, ``llama-perplexity``, ``llama-bench`` and ``llama-imatrix`` are taken from the
  folder named by the environment variable ``MATQUANT_LLAMA_CPP`` (e.g. ``llama.cpp/build/bin``) when it is set,
  else from ``PATH``.

Scripts in lab/benchmarks import this module as ``_paths`` (their own folder is on ``sys.path`` when run as
``python lab/benchmarks/NAME.py``; a script that may be loaded from elsewhere adds that folder first).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

WORK_ENV = "MATQUANT_WORK"
LLAMA_CPP_ENV = "MATQUANT_LLAMA_CPP"
DEFAULT_WORK = "matquant-work"
LLAMA_TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-imatrix")


def work_dir(override: str | os.PathLike | None = None) -> Path:
    """The work folder: ``override`` (a script's ``--work``), else $MATQUANT_WORK, else ./matquant-work."""
    return Path(override or os.environ.get(WORK_ENV) or DEFAULT_WORK)


def work_path(*parts: str, work: str | os.PathLike | None = None) -> Path:
    """A path inside the work folder, e.g. ``work_path("export", "results.jsonl")``."""
    return work_dir(work).joinpath(*parts)


def add_work_option(parser, what: str = "checkpoints, exports and default result files") -> None:
    """The shared ``--work`` option (default: $MATQUANT_WORK, else ./matquant-work)."""
    parser.add_argument("--work", default=None,
                        help=f"work folder for {what} (default: ${WORK_ENV}, else ./{DEFAULT_WORK})")


class LlamaCppNotFound(FileNotFoundError):
    pass


def llama_tool(name: str) -> Path:
    """The path of one llama.cpp binary (``llama-perplexity`` ...): in $MATQUANT_LLAMA_CPP if set, else on PATH."""
    folder = os.environ.get(LLAMA_CPP_ENV)
    if folder:
        cand = Path(folder) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
        raise LlamaCppNotFound(f"{name} is not in {LLAMA_CPP_ENV}={folder}: point {LLAMA_CPP_ENV} at the folder "
                               f"holding llama.cpp's binaries (e.g. llama.cpp/build/bin), or unset it and put them "
                               f"on PATH")
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LlamaCppNotFound(f"{name} not found on PATH: put llama.cpp's binaries (llama.cpp/build/bin) on PATH, or "
                           f"set {LLAMA_CPP_ENV} to the folder holding them")
