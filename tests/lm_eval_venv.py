"""A virtual environment holding lm-evaluation-harness, kept apart from the project's own.

lm-eval pulls many packages (datasets, evaluate, scikit-learn, accelerate, peft, ...), so it
lives in its own venv, built once and reused by every later run: the directory is keyed on
the lm-eval version and the Python version, a ``.complete`` marker is written only after a
successful install, and a lock keeps two test runs from building it at once. torch is
installed first, pinned to the CPU build the project uses, so pip never pulls a CUDA build.

    python = ensure_lm_eval_venv()          # <cache>/lm-eval-0.4.13-py311/bin/python

The cache root is ``$STEERSERVE_TEST_CACHE`` (default ``~/.cache/steerserve-tests``). The
first build downloads from the package index: about 2 minutes on this machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LM_EVAL_VERSION = "0.4.13"
TORCH = "torch==2.13.0"


def cache_root() -> Path:
    return Path(os.environ.get("STEERSERVE_TEST_CACHE") or Path.home() / ".cache" / "steerserve-tests").expanduser()


def ensure_lm_eval_venv(version: str = LM_EVAL_VERSION, *, timeout: float = 1500.0) -> Path:
    """The venv's python, building the venv first if no complete one exists; raises
    ``TimeoutError`` when the build takes longer than ``timeout`` seconds."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"lm-eval-{version}-py{sys.version_info.major}{sys.version_info.minor}"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    with open(root / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a partial build from an interrupted run
        deadline = time.monotonic() + timeout
        log = root / f"{venv.name}.log"
        with open(log, "w") as output:
            for command in ([sys.executable, "-m", "venv", str(venv)],
                            [str(python), "-m", "pip", "install", "--quiet", TORCH],
                            [str(python), "-m", "pip", "install", "--quiet", f"lm-eval[api,hf]=={version}"]):
                remaining = deadline - time.monotonic()
                try:
                    subprocess.run(command, check=True, stdout=output, stderr=subprocess.STDOUT,
                                   timeout=max(1.0, remaining))
                except subprocess.TimeoutExpired:
                    raise TimeoutError(f"building {venv} took over {timeout:.0f} s (log: {log})") from None
                except subprocess.CalledProcessError as err:
                    raise RuntimeError(f"building {venv} failed at {command[2:]} (log: {log})") from err
        marker.write_text(json.dumps({"lm_eval": version, "built": time.time()}) + "\n")
        return python
