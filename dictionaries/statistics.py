"""Reading a dictionary's per-feature statistics (``features.safetensors``, written by the
trainer's publish step) without loading all of it.

``max_activations`` is each feature's recorded maximum activation: the activation at the
centre of its top context, the largest seen over the statistics' windows (0 for a feature
that never fired there). It is the unit of ``value_unit: "max_activation"`` and the
"typical maximum" that search by example divides by.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dictionaries.config import DictionaryError

FEATURES_FILE = "features.safetensors"


def max_activations(directory: Path | str) -> torch.Tensor | None:
    """``(d_sae,)`` float32 maxima from ``directory/features.safetensors``; None without statistics."""
    path = Path(directory) / FEATURES_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if "context_max" not in handle.keys():
                return None
            context_max = handle.get_tensor("context_max")  # (d_sae, contexts), best first
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DictionaryError(f"{FEATURES_FILE}: not a readable safetensors file ({err})") from None
    return context_max.float().max(dim=-1).values.clamp(min=0).contiguous()
