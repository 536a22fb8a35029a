"""Several sparse autoencoders of one architecture and size, trained as one stacked module.

Every member sees the same activation batch; their weights are stacked on a leading axis
and every step is a handful of batched matmuls, not N separate runs:

    pre  = (x − b_dec[n]) · W_enc[n] + b_enc[n]        # (N, B, F)   torch.baddbmm
    f    = act_n(pre)                                  # relu, or the top k_n of ReLU(pre)
    x̂    = f · W_dec[n] + b_dec[n]                      # (N, B, d)

Losses are per member and summed, so the gradient of a member depends on its own weights
only and Adam (elementwise) treats each member as if it were trained alone: a member equals
the same configuration trained by itself with the same seed, up to float rounding.

Loss, with inputs scaled so that E‖x‖² = d_in (the scale is saved as the dictionary's
input normalisation):

    relu   (Σ_d (x̂ − x)² + λ · Σ_i f_i‖W_dec[i]‖) / d_in          (l1_mode "decoder_norm")
           (Σ_d (x̂ − x)² + λ · Σ_i f_i) / d_in, unit-norm rows     (l1_mode "unit_norm")
    topk   Σ_d (x̂ − x)² / d_in + α · AuxK, unit-norm rows; AuxK asks the top ``d_in/2``
           dead latents to reconstruct the residual, which revives them
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

ARCHITECTURES = ("relu", "topk")


@dataclass(frozen=True)
class SaeSpec:
    """One configuration of a sweep."""

    architecture: str = "relu"
    d_sae: int = 1024
    l1: float = 0.0
    """Sparsity coefficient λ (relu)."""
    k: int | None = None
    """Active latents a token (topk)."""
    seed: int = 0
    """Initialisation seed."""
    tied: bool = False
    """relu only: W_enc is W_decᵀ."""
    decoder_bias: bool = True
    l1_mode: str = "decoder_norm"
    """relu: weight the L1 by decoder-row norms, or keep rows at unit norm."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "topk" and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ValueError(f"topk needs 1 <= k <= d_sae, got k={self.k}")
        if self.architecture == "relu" and self.l1 < 0:
            raise ValueError("l1 must be >= 0")
        if self.l1_mode not in ("decoder_norm", "unit_norm"):
            raise ValueError("l1_mode must be 'decoder_norm' or 'unit_norm'")
        if self.tied and self.architecture != "relu":
            raise ValueError("tied weights are for relu dictionaries")

    @property
    def unit_norm_decoder(self) -> bool:
        return self.architecture == "topk" or self.l1_mode == "unit_norm"

    def group_key(self) -> tuple:
        """Members that can be stacked together."""
        return (self.architecture, self.d_sae, self.tied, self.decoder_bias, self.l1_mode)

    def label(self) -> str:
        parts = [self.architecture, f"f{self.d_sae}"]
        parts.append(f"k{self.k}" if self.architecture == "topk" else f"l1-{self.l1:g}")
        return "-".join(parts + ([f"s{self.seed}"] if self.seed else []))


def sweep_specs(architecture: str, d_sae: list[int], *, l1: list[float] = (1.0,), k: list[int] = (32,),
                seeds: list[int] = (0,), tied: bool = False, l1_mode: str = "decoder_norm") -> list[SaeSpec]:
    """Every combination of a sweep: sizes × seeds × (k values for topk, L1 coefficients for relu)."""
    specs = []
    for size, seed in itertools.product(d_sae, seeds):
        if architecture == "topk":
            specs += [SaeSpec("topk", size, k=value, seed=seed) for value in k]
        else:
            specs += [SaeSpec(architecture, size, l1=value, seed=seed, tied=tied, l1_mode=l1_mode) for value in l1]
    return specs


class Ensemble(nn.Module):
    def __init__(self, specs: list[SaeSpec], d_in: int, b_dec_init: torch.Tensor | None = None):
        super().__init__()
        keys = {spec.group_key() for spec in specs}
        if len(keys) != 1:
            raise ValueError("an ensemble stacks members of one architecture, size and weight layout")
        self.specs = list(specs)
        first = specs[0]
        self.architecture, self.d_sae, self.d_in = first.architecture, first.d_sae, d_in
        self.tied, self.unit_norm = first.tied, first.unit_norm_decoder
        w_dec = []
        for spec in specs:  # each member from its own seed, as if trained alone
            generator = torch.Generator().manual_seed(spec.seed)
            rows = torch.randn(spec.d_sae, d_in, generator=generator)
            rows = rows / rows.norm(dim=-1, keepdim=True)
            w_dec.append(rows if self.unit_norm else rows * 0.1)
        self.W_dec = nn.Parameter(torch.stack(w_dec))  # (N, F, d)
        if not self.tied:
            self.W_enc = nn.Parameter(self.W_dec.detach().transpose(1, 2).clone())  # (N, d, F)
        self.b_enc = nn.Parameter(torch.zeros(len(specs), self.d_sae))  # (N, F)
        b_dec = (b_dec_init if b_dec_init is not None else torch.zeros(d_in)).expand(len(specs), d_in).clone()
        if first.decoder_bias:
            self.b_dec = nn.Parameter(b_dec)  # (N, d)
        else:
            self.register_buffer("b_dec", torch.zeros(len(specs), d_in))
        self.register_buffer("l1", torch.tensor([s.l1 for s in specs], dtype=torch.float32))  # (N,)
        self.register_buffer("k", torch.tensor([s.k or 0 for s in specs], dtype=torch.long))  # (N,)

    @property
    def encoder(self) -> torch.Tensor:
        return self.W_dec.transpose(1, 2) if self.tied else self.W_enc  # (N, d, F)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, d)`` → ``(pre, f)``, each ``(N, B, F)``."""
        centred = x.unsqueeze(0) - self.b_dec.unsqueeze(1)  # (N, B, d)
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), centred, self.encoder)  # (N, B, F)
        if self.architecture == "relu":
            return pre, torch.relu(pre)
        k_max = int(self.k.max())
        top = torch.relu(pre).topk(k_max, dim=-1)  # (N, B, k_max)
        keep = torch.arange(k_max, device=x.device) < self.k.view(-1, 1, 1)  # member n keeps its first k_n
        return pre, torch.zeros_like(pre).scatter(-1, top.indices, top.values * keep)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)  # (N, B, d)

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_coefficient: float = 1 / 32,
               total_variance: torch.Tensor | None = None) -> dict:
        """Per-member losses and statistics on ``x (B, d)``; ``dead (N, F)`` bool.
        ``total_variance`` is Σ‖x − μ‖² of the whole batch when ``x`` is a slice of it."""
        pre, f = self.encode(x)
        reconstruction = self.decode(f)
        error = reconstruction - x.unsqueeze(0)  # (N, B, d)
        mse = error.pow(2).sum(-1).mean(-1) / self.d_in  # (N,)
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = error.detach().pow(2).sum((-1, -2)) / total_variance  # (N,)
        if self.architecture == "relu":
            weights = self.W_dec.norm(dim=-1).unsqueeze(1) if not self.unit_norm else 1.0  # (N, 1, F)
            sparsity = self.l1 * (f * weights).sum(-1).mean(-1) / self.d_in  # (N,) a mean over tokens
            aux = torch.zeros_like(mse)
        else:
            sparsity = torch.zeros_like(mse)
            aux = self._aux_loss(pre, error.detach(), dead, total_variance) * aux_coefficient  # a sum over tokens / TV
        # "loss" is a mean over these tokens, "aux" a sum over them divided by the whole batch's variance
        return {"loss": mse + sparsity, "aux": aux, "mse": mse.detach(), "fvu": fvu,
                "l0": (f > 0).float().sum(-1).mean(-1).detach(), "fired": (f > 0).any(1)}

    def _aux_loss(self, pre, residual, dead, total_variance) -> torch.Tensor:
        n = pre.shape[0]
        if dead is None or not bool(dead.any()):
            return torch.zeros(n, device=pre.device)
        n_dead = dead.sum(-1)  # (N,)
        k_aux = n_dead.clamp(max=self.d_in // 2)  # (N,) each member its own, as if trained alone
        k_max = int(k_aux.max())
        candidates = torch.where(dead.unsqueeze(1), pre, torch.full_like(pre, -torch.inf))  # only dead latents
        top = candidates.topk(k_max, dim=-1)  # (N, B, k_max)
        keep = (torch.arange(k_max, device=pre.device) < k_aux.view(-1, 1, 1)) & torch.isfinite(top.values)
        values = torch.where(keep, torch.relu(top.values), 0.0)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, values)  # (N, B, F)
        predicted = torch.bmm(acts, self.W_dec)  # (N, B, d): no bias, it predicts the residual
        scale = (n_dead.float() / k_aux.clamp(min=1)).clamp(max=1.0)  # fewer dead latents, smaller loss
        return scale * (predicted + residual).pow(2).sum((-1, -2)) / total_variance  # residual = x̂ − x

    @torch.no_grad()
    def constrain_before_step(self) -> None:
        """Unit-norm decoders: drop the gradient component along each decoder row."""
        if self.unit_norm and self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def constrain_after_step(self) -> None:
        if self.unit_norm:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    def member_weights(self, n: int) -> dict[str, torch.Tensor]:
        """Member ``n`` in the native key layout."""
        return {
            "W_enc": self.encoder[n].detach().clone(),
            "b_enc": self.b_enc[n].detach().clone(),
            "W_dec": self.W_dec[n].detach().clone(),
            "b_dec": self.b_dec[n].detach().clone(),
        }
