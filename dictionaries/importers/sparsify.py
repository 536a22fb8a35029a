"""EleutherAI sparsify: a hookpoint folder (``layers.3/``) with ``cfg.json`` + ``sae.safetensors``.

Weights are ``encoder.weight [F, d_in]``, ``encoder.bias [F]``, ``W_dec [F, d_in]`` and
``b_dec [d_in]``; encode is ``ReLU(encoder(x − b_dec))`` then the top ``k``, decode
``acts·W_dec + b_dec``: a topk dictionary with ``W_enc = encoder.weightᵀ``. The hookpoint
``layers.N`` (the output of layer N) maps to ``blocks.N.hook_resid_post``. Transcoders,
skip connections and non-topk activations are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from dictionaries.config import DictionaryConfig, DictionaryError
from dictionaries.format import read_json, read_safetensors
from dictionaries.importers.common import build, dtype_name, expect_shape, hook_or_fail, require

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
_HOOKPOINT = re.compile(r"^(?:.*\.)?layers\.(\d+)$")


def hookpoint_to_hook(hookpoint: str) -> str | None:
    """``layers.3`` (or ``gpt_neox.layers.3``) → ``blocks.3.hook_resid_post``."""
    match = _HOOKPOINT.match(hookpoint)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else None


def import_sparsify(path: Path, *, model: str | None = None, hook: str | None = None):
    cfg = read_json(path / CONFIG, f"sparsify {CONFIG}")
    weights = read_safetensors(path / WEIGHTS, f"sparsify {WEIGHTS}")
    what = f"sparsify {WEIGHTS}"
    if cfg.get("transcode"):
        raise DictionaryError(f"sparsify {CONFIG}: transcoders are not supported (transcode: true)")
    if cfg.get("skip_connection") or "W_skip" in weights:
        raise DictionaryError(f"sparsify {CONFIG}: skip connections are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryError(f"sparsify {CONFIG}: activation {cfg['activation']!r} is not supported (topk only)")
    require(what, weights, "encoder.weight", "encoder.bias", "W_dec", "b_dec")
    extra = sorted(set(weights) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise DictionaryError(f"{what}: unexpected key(s) {', '.join(extra)}")

    d_in = cfg.get("d_in")
    if not isinstance(d_in, int):
        raise DictionaryError(f"sparsify {CONFIG}: 'd_in' must be an integer")
    d_sae = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 0) or 0)
    if not d_sae:
        raise DictionaryError(f"sparsify {CONFIG}: neither 'num_latents' nor 'expansion_factor' gives the number of latents")
    expect_shape(what, "encoder.weight", weights["encoder.weight"], (d_sae, d_in))
    expect_shape(what, "encoder.bias", weights["encoder.bias"], (d_sae,))
    expect_shape(what, "W_dec", weights["W_dec"], (d_sae, d_in))
    expect_shape(what, "b_dec", weights["b_dec"], (d_in,))

    config = DictionaryConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=cfg.get("k"),
        hook=hook_or_fail(hook or hookpoint_to_hook(path.name), f"the folder name {path.name!r}"),
        model_name=model or "",
        dtype=dtype_name(what, weights["W_dec"]),
        provenance={"imported_from": "sparsify", "source": str(path), "hookpoint": path.name},
    )
    native = {
        "W_enc": weights["encoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    return build(config, native, what)
