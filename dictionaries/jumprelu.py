"""``jumprelu``: a per-feature threshold, ``f = ReLU(pre)·[pre > threshold]``."""

from __future__ import annotations

import torch

from dictionaries.sae import Dictionary, register


@register
class JumpReluDictionary(Dictionary):
    architecture = "jumprelu"
    weight_shapes = {**Dictionary.weight_shapes, "threshold": "d_sae"}

    def activation(self, pre: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        threshold = self.threshold if features is None else self.threshold[features]
        return torch.relu(pre) * (pre > threshold)

    def encode_subset(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x_normed, _ = self.normalize(x)
        return self.activation(self.pre_activations(x_normed, features), features)  # (..., |S|)
