"""``relu``: the L1-trained dictionary of the sparse-coding work on Pythia residual streams.

``f = ReLU(pre)``. Optionally tied (``W_enc = W_decᵀ``, checked when loading) and with or
without a decoder bias (``decoder_bias = false`` keeps ``b_dec`` at zero).
"""

from __future__ import annotations

import torch

from dictionaries.sae import Dictionary, FeatureSubset, register


@register
class ReluDictionary(Dictionary):
    architecture = "relu"

    def activation(self, pre: torch.Tensor, subset: FeatureSubset | None = None) -> torch.Tensor:
        return torch.relu(pre)

    def encode_subset(self, x: torch.Tensor, features) -> torch.Tensor:
        x_normed, _ = self.normalize(x)
        return torch.relu(self.pre_activations(x_normed, self._as_subset(features)))  # (..., |S|)
