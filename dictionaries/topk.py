"""``topk``: keep the ``k`` largest pre-activations of each token (after a ReLU), zero the rest.

Which features are active depends on all of them, so a subset encode is the full encode.
"""

from __future__ import annotations

import torch

from dictionaries.sae import Dictionary, FeatureSubset, register


@register
class TopKDictionary(Dictionary):
    architecture = "topk"

    def activation(self, pre: torch.Tensor, subset: FeatureSubset | None = None) -> torch.Tensor:
        if subset is not None:
            raise ValueError("a topk dictionary ranks all features; encode them all, then select")
        top = pre.topk(self.config.k, dim=-1, sorted=False)  # values, indices: (..., k)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
