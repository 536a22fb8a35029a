"""Steered generation with continuous batching.

- :mod:`~editing.engine.engine` — :class:`Engine`: the model, its dictionaries, request checks,
  ``generate`` and ``inspect``;
- :mod:`~editing.engine.scheduler` — the iteration-level scheduler (admission, chunked
  prefill, decode, retirement, cancellation);
- :mod:`~editing.engine.batch` — the running batch's per-slot state and its forwards;
- :mod:`~editing.engine.kv_cache` — preallocated key/value slots with per-row lengths;
- :mod:`~editing.engine.edit_tables` — per-row edits of one dictionary, and the hook;
- :mod:`~editing.engine.sampling` — per-row sampling with counter-based seeds.
"""

from editing.engine.engine import Engine
from editing.engine.requests import EngineError, GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineError", "GenerationRequest", "GenerationResult"]
