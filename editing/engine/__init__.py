"""Steered generation with continuous batching.

- :mod:`~editing.engine.engine` — :class:`Engine`: the model, its dictionaries, request checks,
  ``generate`` and ``inspect``;
- :mod:`~editing.engine.scheduler` — the iteration-level scheduler (admission, chunked
  prefill, decode, retirement, cancellation);
- :mod:`~editing.engine.batch` — the running batch's per-slot state and its forwards;
- :mod:`~editing.engine.kv_cache` — preallocated key/value slots with per-row lengths;
- :mod:`~editing.engine.edit_tables` — per-row edits and conditions of one dictionary;
- :mod:`~editing.engine.vector_tables` — per-row steering-vector edits at one hook point;
- :mod:`~editing.engine.conditions` — where each row's conditions hold, a forward at a time;
- :mod:`~editing.engine.editors` — one hook a hook point, running its tables in order;
- :mod:`~editing.engine.sampling` — per-row sampling with counter-based seeds.
"""

from editing.engine.engine import Engine
from editing.engine.requests import EngineError, GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineError", "GenerationRequest", "GenerationResult"]
