"""What leaves the server says nothing of its file system: absolute paths in answers become
``<server path>`` (job errors and results, a dictionary's provenance and metrics, feature
statistics). The store's files keep the paths for the admin and the CLI."""

from __future__ import annotations

import re

_SERVER_PATH = re.compile(r"(?<![\w.:/~-])(?:~|/)[^\s'\"`,;:()\[\]{}<>]*")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``<server path>``: a job's error reaches its
    owner, who must learn nothing of the server's file system from it."""
    return _SERVER_PATH.sub("<server path>", text)


def redacted(value):
    """``value`` (JSON-like) with :func:`redact_paths` applied to every string in it: what a
    stored dictionary records of where it came from (a run directory, a registered corpus's
    file) reaches callers without the server's paths."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(item) for item in value]
    return value
