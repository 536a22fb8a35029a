"""Shared checks for the importers."""

from __future__ import annotations

import torch

from dictionaries.config import HOOK_NAME, DictionaryConfig, DictionaryError
from dictionaries.format import validate_weights
from dictionaries.sae import Dictionary

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def expect_shape(what: str, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise DictionaryError(f"{what}: '{key}' has shape {list(tensor.shape)}; expected {list(shape)} from the config")


def require(what: str, weights: dict, *keys: str) -> None:
    missing = [key for key in keys if key not in weights]
    if missing:
        raise DictionaryError(f"{what}: missing key(s) {', '.join(missing)} (found: {', '.join(sorted(weights)) or 'none'})")


def hook_or_fail(hook: str | None, source: str) -> str:
    if hook is None:
        raise DictionaryError(f"cannot tell the hook point from {source}; pass --hook blocks.<L>.hook_resid_post")
    if not HOOK_NAME.match(hook):
        raise DictionaryError(f"hook point {hook!r} (from {source}) is not a residual-stream hook point; pass --hook")
    return hook


def dtype_name(what: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in DTYPE_NAMES:
        raise DictionaryError(f"{what}: weights are {tensor.dtype}; expected float32, bfloat16 or float16")
    return DTYPE_NAMES[tensor.dtype]


def build(config: DictionaryConfig, weights: dict[str, torch.Tensor], what: str) -> Dictionary:
    weights = {key: value.contiguous() for key, value in weights.items()}
    validate_weights(config, weights, what)
    return Dictionary.from_config(config, weights)
