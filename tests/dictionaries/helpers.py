"""Independent reference computations and small dictionaries for the dictionary tests."""

import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary

HOOK = "blocks.1.hook_resid_post"


def make(arch: str, d_in: int = 16, d_sae: int = 48, dtype: str = "float32", seed: int = 0, **overrides) -> Dictionary:
    config = DictionaryConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook=overrides.pop("hook", HOOK), dtype=dtype,
                              k=overrides.pop("k", 5 if arch == "topk" else None), **overrides)
    return Dictionary.random(config, seed=seed)


def reference_encode(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """Encode in float64 with einsum and an explicit per-token top-k: written apart from the library."""
    c = dictionary.config
    w = {k: v.double() for k, v in dictionary.weights().items()}
    x = x.double()
    kind = c.normalization["kind"]
    out_scale, shift = torch.ones_like(x[..., :1]), torch.zeros_like(x[..., :1])
    if kind == "scale":
        x, out_scale = x * c.normalization["factor"], out_scale / c.normalization["factor"]
    elif kind == "constant_norm_rescale":
        norm = x.pow(2).sum(-1, keepdim=True).sqrt()
        x, out_scale = x * (c.d_in**0.5) / norm, norm / (c.d_in**0.5)
    elif kind == "layer_norm":
        mean = x.mean(-1, keepdim=True)
        std = ((x - mean).pow(2).sum(-1, keepdim=True) / (c.d_in - 1)).sqrt()
        x, out_scale, shift = (x - mean) / (std + c.normalization.get("eps", 1e-5)), std, mean
    if c.apply_b_dec_to_input:
        x = x - w["b_dec"]
    pre = torch.einsum("...i,if->...f", x, w["W_enc"]) + w["b_enc"]
    if c.architecture == "relu":
        f = pre.clamp(min=0)
    elif c.architecture == "jumprelu":
        f = torch.where(pre > w["threshold"], pre, torch.zeros_like(pre)).clamp(min=0)
    else:
        flat = pre.reshape(-1, c.d_sae)
        f = torch.zeros_like(flat)
        for row in range(flat.shape[0]):
            order = sorted(range(c.d_sae), key=lambda j: -float(flat[row, j]))[: c.k]
            for j in order:
                f[row, j] = max(float(flat[row, j]), 0.0)
        f = f.reshape(pre.shape)
    return f, out_scale, shift


def reference_decode(dictionary: Dictionary, f: torch.Tensor, out_scale, shift) -> torch.Tensor:
    w = {k: v.double() for k, v in dictionary.weights().items()}
    return (torch.einsum("...f,fi->...i", f.double(), w["W_dec"]) + w["b_dec"]) * out_scale + shift
