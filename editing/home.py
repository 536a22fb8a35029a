"""Where steerserve keeps its data: ``$STEERSERVE_HOME`` (default ``~/.cache/steerserve``).

    models/         built or imported models (``models/pythia-tiny/``)
    dictionaries/   the dictionary store
    activations/    cached activation shards
    jobs.sqlite     job records of the service
"""

from __future__ import annotations

import os
from pathlib import Path


def steerserve_home() -> Path:
    """The data home, read from the environment on every call (tests set their own)."""
    return Path(os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve").expanduser()


def models_dir() -> Path:
    return steerserve_home() / "models"


def dictionaries_dir() -> Path:
    return steerserve_home() / "dictionaries"


def activations_dir() -> Path:
    return steerserve_home() / "activations"
