"""SAELens: ``cfg.json`` + ``sae_weights.safetensors``, the v6 config or the flat pre-6 one.

v6 puts ``architecture`` ("standard", "topk", "jumprelu", ...) and ``k`` at the top level and
the model and hook under ``metadata`` (``meta`` in some releases). The pre-6 config is
flat: ``hook_name``, ``model_name``, and ``activation_fn_str`` / ``activation_fn_kwargs``
decide topk. Weights use the same key names as ours; old jumprelu files may carry
``log_threshold`` instead of ``threshold``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dictionaries.config import DictionaryConfig, DictionaryError
from dictionaries.format import read_json, read_safetensors
from dictionaries.importers.common import build, dtype_name, expect_shape, hook_or_fail, require

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def import_saelens(path: Path, *, model: str | None = None, hook: str | None = None):
    cfg = read_json(path / CONFIG, f"SAELens {CONFIG}")
    weights = read_safetensors(path / WEIGHTS, f"SAELens {WEIGHTS}")
    what = f"SAELens {WEIGHTS}"
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    flat = "metadata" not in cfg and "meta" not in cfg

    architecture = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if flat and cfg.get("activation_fn_str", "relu") == "topk":
        architecture = "topk"
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    elif flat and cfg.get("activation_fn_str", "relu") not in ("relu", None):
        raise DictionaryError(f"SAELens {CONFIG}: activation_fn_str {cfg['activation_fn_str']!r} is not supported (relu or topk)")
    if architecture not in ARCHITECTURES:
        raise DictionaryError(
            f"SAELens {CONFIG}: architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise DictionaryError(f"SAELens {CONFIG}: rescale_acts_by_decoder_norm is not supported")
    if cfg.get("reshape_activations", "none") != "none":
        raise DictionaryError(f"SAELens {CONFIG}: reshape_activations {cfg['reshape_activations']!r} (attention hook_z) is not supported")
    if cfg.get("finetuning_scaling_factor") and "scaling_factor" in weights:
        if not bool((weights["scaling_factor"] == 1).all()):
            raise DictionaryError(f"{what}: a finetuning scaling_factor other than 1 is not supported")
    weights.pop("scaling_factor", None)

    normalization = {"kind": cfg.get("normalize_activations", "none") or "none"}
    if normalization["kind"] == "expected_average_only_in":
        raise DictionaryError(
            f"SAELens {CONFIG}: normalize_activations 'expected_average_only_in' needs the release's scaling factor, "
            "which the files do not hold; fold it into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if normalization["kind"] not in ("none", "constant_norm_rescale", "layer_norm"):
        raise DictionaryError(f"SAELens {CONFIG}: normalize_activations {normalization['kind']!r} is not supported")

    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not isinstance(d_in, int) or not isinstance(d_sae, int):
        raise DictionaryError(f"SAELens {CONFIG}: 'd_in' and 'd_sae' must be integers")
    ours = ARCHITECTURES[architecture]
    if ours == "jumprelu" and "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = torch.exp(weights.pop("log_threshold"))
    keys = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if ours == "jumprelu" else [])
    require(what, weights, *keys)
    extra = sorted(set(weights) - set(keys))
    if extra:
        raise DictionaryError(f"{what}: unexpected key(s) {', '.join(extra)} for a SAELens {architecture} SAE")
    expect_shape(what, "W_enc", weights["W_enc"], (d_in, d_sae))
    expect_shape(what, "W_dec", weights["W_dec"], (d_sae, d_in))
    expect_shape(what, "b_enc", weights["b_enc"], (d_sae,))
    expect_shape(what, "b_dec", weights["b_dec"], (d_in,))

    config = DictionaryConfig(
        architecture=ours,
        d_in=d_in,
        d_sae=d_sae,
        k=k if ours == "topk" else None,
        hook=hook_or_fail(hook or meta.get("hook_name") or cfg.get("hook_name"), f"SAELens {CONFIG}"),
        model_name=model or meta.get("model_name") or cfg.get("model_name") or "",
        normalization=normalization,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        dtype=dtype_name(what, weights["W_enc"]),
        provenance={"imported_from": "saelens", "source": str(path), "config_style": "flat" if flat else "v6",
                    "saelens_architecture": architecture},
    )
    return build(config, weights, what)
