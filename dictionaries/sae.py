"""The inference-side sparse autoencoder ("dictionary"): encode, decode, forward.

Every architecture shares the affine parts and differs only in its activation:

    pre   = (n(x) − b_dec·[apply_b_dec_to_input]) · W_enc + b_enc     # (..., d_sae)
    f     = act(pre)                                                  # relu / topk / jumprelu
    x̂     = n⁻¹(f · W_dec + b_dec)                                     # (..., d_in)

``n`` is the input normalisation (see :mod:`dictionaries.config`). Per-token
normalisations need the input's statistics to decode, so :meth:`Dictionary.normalize`
returns a :class:`NormState` that :meth:`Dictionary.decode` takes back.

For ``relu`` and ``jumprelu`` a feature depends on its own column only, so
:meth:`Dictionary.encode_subset` computes ``|S|`` dot products a token; ``topk`` must rank
all pre-activations and falls back to the full encode. Architectures register themselves
in :data:`ARCHITECTURE_CLASSES` (one module each: ``relu.py``, ``topk.py``, ``jumprelu.py``).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from dictionaries.config import DictionaryConfig, DictionaryError

ARCHITECTURE_CLASSES: dict[str, type["Dictionary"]] = {}

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(cls: type["Dictionary"]) -> type["Dictionary"]:
    ARCHITECTURE_CLASSES[cls.architecture] = cls
    return cls


class FeatureSubset(NamedTuple):
    """The weights of a set ``S`` of features, gathered once (the engine reuses them every step)."""

    features: torch.Tensor  # (|S|,) long
    W_enc: torch.Tensor  # (d_in, |S|)
    b_enc: torch.Tensor  # (|S|,)
    W_dec: torch.Tensor  # (|S|, d_in)
    threshold: torch.Tensor | None  # (|S|,) for jumprelu


class NormState(NamedTuple):
    """How one input was normalised: ``n(x) = (x − shift)·in_scale``, ``n⁻¹(y) = y·out_scale + shift``."""

    in_scale: torch.Tensor | float  # (..., 1) or a constant
    out_scale: torch.Tensor | float
    shift: torch.Tensor | float


class Dictionary(nn.Module):
    architecture: ClassVar[str] = ""
    weight_shapes: ClassVar[dict[str, str]] = {"W_enc": "d_in,d_sae", "b_enc": "d_sae", "W_dec": "d_sae,d_in", "b_dec": "d_in"}

    def __init__(self, config: DictionaryConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        if config.architecture != self.architecture:
            raise DictionaryError(f"{type(self).__name__} cannot hold a {config.architecture!r} dictionary")
        self.config = config
        for name in self.weight_shapes:
            if name not in weights:
                raise DictionaryError(f"weights: '{name}' is missing")
            self.register_parameter(name, nn.Parameter(weights[name], requires_grad=False))

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_config(cls, config: DictionaryConfig, weights: dict[str, torch.Tensor]) -> "Dictionary":
        """The right architecture class for ``config``."""
        return ARCHITECTURE_CLASSES[config.architecture](config, weights)

    @classmethod
    def random(cls, config: DictionaryConfig, seed: int = 0) -> "Dictionary":
        """A randomly initialised dictionary (unit-norm decoder rows, ``W_enc = W_decᵀ``)."""
        generator = torch.Generator().manual_seed(seed)
        dtype = TORCH_DTYPES[config.dtype]
        w_dec = torch.randn(config.d_sae, config.d_in, generator=generator)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        weights = {
            "W_enc": w_dec.T.contiguous(),
            "b_enc": torch.zeros(config.d_sae),
            "W_dec": w_dec,
            "b_dec": torch.zeros(config.d_in) if not config.decoder_bias else 0.1 * torch.randn(config.d_in, generator=generator),
        }
        if "threshold" in ARCHITECTURE_CLASSES[config.architecture].weight_shapes:
            weights["threshold"] = 0.05 * torch.rand(config.d_sae, generator=generator)
        return cls.from_config(config, {k: v.to(dtype) for k, v in weights.items()})

    # --- normalisation ----------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormState]:
        x = x.to(self.W_enc.dtype)
        norm = self.config.normalization
        kind = norm["kind"]
        if kind == "none":
            return x, NormState(1.0, 1.0, 0.0)
        if kind == "scale":
            factor = float(norm["factor"])
            return x * factor, NormState(factor, 1.0 / factor, 0.0)
        if kind == "constant_norm_rescale":
            scale = self.config.d_in**0.5 / x.norm(dim=-1, keepdim=True)  # (..., 1)
            return x * scale, NormState(scale, 1.0 / scale, 0.0)
        # layer_norm, as SAELens applies it: divide by std + eps, multiply back by std
        mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
        centred = x - mean
        std = centred.std(dim=-1, keepdim=True)  # (..., 1)
        in_scale = 1.0 / (std + float(norm.get("eps", 1e-5)))
        return centred * in_scale, NormState(in_scale, std, mean)

    def _needs_state(self) -> bool:
        return self.config.normalization["kind"] in ("constant_norm_rescale", "layer_norm")

    # --- encode ------------------------------------------------------------------------

    def subset(self, features: torch.Tensor) -> FeatureSubset:
        """Gather the weights of ``features`` for repeated subset encodes and deltas."""
        features = features.to(self.W_enc.device)
        threshold = getattr(self, "threshold", None)
        return FeatureSubset(
            features=features,
            W_enc=self.W_enc[:, features].contiguous(),
            b_enc=self.b_enc[features],
            W_dec=self.W_dec[features].contiguous(),
            threshold=threshold[features] if threshold is not None else None,
        )

    def _as_subset(self, features) -> FeatureSubset:
        return features if isinstance(features, FeatureSubset) else self.subset(features)

    def pre_activations(self, x_normed: torch.Tensor, subset: FeatureSubset | None = None) -> torch.Tensor:
        """``(n(x) − b_dec)·W_enc + b_enc`` for all features, or only for a subset."""
        centred = x_normed - self.b_dec if self.config.apply_b_dec_to_input else x_normed
        if subset is None:
            return centred @ self.W_enc + self.b_enc  # (..., d_sae)
        return centred @ subset.W_enc + subset.b_enc  # (..., |S|)

    def activation(self, pre: torch.Tensor, subset: FeatureSubset | None = None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_sae)`` of activations ``x (..., d_in)``."""
        x_normed, _ = self.normalize(x)
        return self.activation(self.pre_activations(x_normed))

    def encode_subset(self, x: torch.Tensor, features: torch.Tensor | FeatureSubset) -> torch.Tensor:
        """``encode(x)[..., features]``; relu and jumprelu compute only those columns."""
        features = features.features if isinstance(features, FeatureSubset) else features
        return self.encode(x)[..., features]

    # --- decode ------------------------------------------------------------------------

    def decode(self, feature_acts: torch.Tensor, state: NormState | None = None) -> torch.Tensor:
        """``n⁻¹(f·W_dec + b_dec)``; per-token normalisations need ``normalize``'s state."""
        if state is None:
            if self._needs_state():
                raise DictionaryError(f"decoding a {self.config.normalization['kind']}-normalised dictionary needs the input's NormState")
            factor = float(self.config.normalization.get("factor", 1.0))
            state = NormState(factor, 1.0 / factor, 0.0)
        reconstruction = feature_acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec  # (..., d_in)
        return reconstruction * state.out_scale + state.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``x̂`` of ``x``."""
        x_normed, state = self.normalize(x)
        return self.decode(self.activation(self.pre_activations(x_normed)), state)

    def delta(self, feature_delta: torch.Tensor, features: torch.Tensor | FeatureSubset, state: NormState) -> torch.Tensor:
        """What changing features ``S`` by ``feature_delta (..., |S|)`` writes into ``h``:
        ``n⁻¹``'s scale times ``(f'_S − f_S)·W_dec[S]``; the error term is untouched."""
        w_dec = features.W_dec if isinstance(features, FeatureSubset) else self.W_dec[features]
        return (feature_delta.to(self.W_dec.dtype) @ w_dec) * state.out_scale  # (..., d_in)

    # --- description ---------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in self.weight_shapes}

    def extra_repr(self) -> str:
        c = self.config
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, hook={c.hook}" + (f", k={c.k}" if c.k else "")


# The architectures register themselves on import; they need Dictionary, defined above.
from dictionaries import jumprelu, relu, topk  # noqa: E402, F401
