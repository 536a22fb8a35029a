"""The dictionary's ``config.json``: a small frozen dataclass, validated where it is built.

    {
      "format": "steerserve.dictionary/1",
      "architecture": "relu" | "topk" | "jumprelu",
      "d_in": 128, "d_sae": 1024, "k": null,
      "hook": "blocks.2.hook_resid_post",
      "model": {"name": "pythia-tiny", "sha256": "..."},
      "normalization": {"kind": "none"},
      "apply_b_dec_to_input": true,
      "tied": false, "decoder_bias": true,
      "dtype": "float32",
      "provenance": {...},
      "weights_sha256": "..."
    }

Encode is ``f = act((n(x) − b_dec·[apply_b_dec_to_input])·W_enc + b_enc)`` and decode
``x̂ = n⁻¹(f·W_dec + b_dec)``, where ``n`` is the input normalisation:

    none                      n(x) = x
    scale {factor}            n(x) = factor·x                      (a constant)
    constant_norm_rescale     n(x) = x·√d_in / ‖x‖                 (per token)
    layer_norm {eps}          n(x) = (x − mean) / (std + eps)      (per token)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

FORMAT = "steerserve.dictionary/1"
ARCHITECTURES = ("relu", "topk", "jumprelu")
DTYPES = ("float32", "bfloat16", "float16")
NORMALIZATIONS = ("none", "scale", "constant_norm_rescale", "layer_norm")
HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")


class DictionaryError(ValueError):
    """A dictionary, its config or its files are not valid; the message names what."""


@dataclass(frozen=True)
class DictionaryConfig:
    architecture: str
    """``relu`` (L1-trained, ReLU encoder), ``topk`` (k largest per token) or ``jumprelu``."""
    d_in: int
    """Width of the activation at the hook point."""
    d_sae: int
    """Number of features."""
    hook: str
    """Where the dictionary reads and writes: ``blocks.{L}.hook_resid_post|pre``."""
    model_name: str = ""
    """The model it was trained on (``pythia-tiny``, a hub id, or a path)."""
    model_sha256: str = ""
    """SHA-256 of that model's weights, when known; checked against the loaded model."""
    k: int | None = None
    """Active features a token, for ``topk`` only."""
    normalization: dict = field(default_factory=lambda: {"kind": "none"})
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` before encoding (SAELens' flag of the same name)."""
    tied: bool = False
    """``W_enc == W_decᵀ`` (the tied-weight relu dictionaries of the sparse-coding work)."""
    decoder_bias: bool = True
    """False: ``b_dec`` is all zeros and stays so."""
    dtype: str = "float32"
    provenance: dict = field(default_factory=dict)
    """Who made it and how: trainer settings, or the importer and source files."""
    weights_sha256: str = ""

    def __post_init__(self):
        def fail(field_name: str, message: str):
            raise DictionaryError(f"config.json: '{field_name}' {message}")

        if self.architecture not in ARCHITECTURES:
            fail("architecture", f"is {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.architecture == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= self.d_sae:
                fail("k", f"must be an integer in [1, d_sae={self.d_sae}] for a topk dictionary, got {self.k!r}")
        elif self.k is not None:
            fail("k", f"applies to topk dictionaries only, not {self.architecture}")
        if not isinstance(self.hook, str) or not HOOK_NAME.match(self.hook):
            fail("hook", f"is {self.hook!r}; expected 'blocks.<layer>.hook_resid_post' or 'blocks.<layer>.hook_resid_pre'")
        if self.dtype not in DTYPES:
            fail("dtype", f"is {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.tied and self.architecture != "relu":
            fail("tied", "applies to relu dictionaries only")
        kind = self.normalization.get("kind") if isinstance(self.normalization, dict) else None
        if kind not in NORMALIZATIONS:
            fail("normalization", f"kind is {kind!r}; expected one of {', '.join(NORMALIZATIONS)}")
        if kind == "scale":
            factor = self.normalization.get("factor")
            if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
                fail("normalization", f"factor must be a finite positive number, got {factor!r}")
        if kind == "layer_norm":
            eps = self.normalization.get("eps", 1e-5)
            if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
                fail("normalization", f"eps must be a finite number >= 0, got {eps!r}")

    @property
    def layer(self) -> int:
        return int(HOOK_NAME.match(self.hook).group(1))

    def to_json(self) -> dict:
        data = asdict(self)
        return {
            "format": FORMAT,
            "architecture": data["architecture"],
            "d_in": data["d_in"],
            "d_sae": data["d_sae"],
            "k": data["k"],
            "hook": data["hook"],
            "model": {"name": data["model_name"], "sha256": data["model_sha256"]},
            "normalization": data["normalization"],
            "apply_b_dec_to_input": data["apply_b_dec_to_input"],
            "tied": data["tied"],
            "decoder_bias": data["decoder_bias"],
            "dtype": data["dtype"],
            "provenance": data["provenance"],
            "weights_sha256": data["weights_sha256"],
        }

    @classmethod
    def from_json(cls, data) -> "DictionaryConfig":
        if not isinstance(data, dict):
            raise DictionaryError("config.json: expected a JSON object")
        if data.get("format") != FORMAT:
            raise DictionaryError(f"config.json: 'format' is {data.get('format')!r}; expected {FORMAT!r}")
        for required in ("architecture", "d_in", "d_sae", "hook"):
            if required not in data:
                raise DictionaryError(f"config.json: '{required}' is missing")
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise DictionaryError("config.json: 'model' must be an object with 'name' and 'sha256'")
        return cls(
            architecture=data["architecture"],
            d_in=data["d_in"],
            d_sae=data["d_sae"],
            hook=data["hook"],
            model_name=str(model.get("name") or ""),
            model_sha256=str(model.get("sha256") or ""),
            k=data.get("k"),
            normalization=data.get("normalization") or {"kind": "none"},
            apply_b_dec_to_input=bool(data.get("apply_b_dec_to_input", True)),
            tied=bool(data.get("tied", False)),
            decoder_bias=bool(data.get("decoder_bias", True)),
            dtype=data.get("dtype", "float32"),
            provenance=data.get("provenance") or {},
            weights_sha256=str(data.get("weights_sha256") or ""),
        )
