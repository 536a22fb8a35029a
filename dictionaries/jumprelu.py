"""``jumprelu``: a per-feature threshold, ``f = ReLU(pre)·[pre > threshold]``."""

from __future__ import annotations

import torch

from dictionaries.sae import Dictionary, FeatureSubset, register


@register
class JumpReluDictionary(Dictionary):
    architecture = "jumprelu"
    weight_shapes = {**Dictionary.weight_shapes, "threshold": "d_sae"}

    def activation(self, pre: torch.Tensor, subset: FeatureSubset | None = None) -> torch.Tensor:
        threshold = self.threshold if subset is None else subset.threshold
        return torch.relu(pre) * (pre > threshold)

    def encode_subset(self, x: torch.Tensor, features) -> torch.Tensor:
        x_normed, _ = self.normalize(x)
        subset = self._as_subset(features)
        return self.activation(self.pre_activations(x_normed, subset), subset)  # (..., |S|)
