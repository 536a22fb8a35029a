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
    jumprelu (Σ_d (x̂ − x)² + λ · Σ_i H(pre_i − θ_i)) / d_in, unit-norm rows, f = pre·H(pre − θ):
           the L0 penalty and the jump have no gradient of their own, so θ learns through
           straight-through estimates with a rectangle kernel of width ε ("bandwidth")
           around the threshold, as in Rajamanoharan et al. 2024 (JumpReLU SAEs)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

ARCHITECTURES = ("relu", "topk", "jumprelu")
TARGET_START = 0.01
"""The coefficient a target-L0 member starts from unless one is given: weak, so L0 comes down
to the target from above (raising a threshold is easy; nothing but reconstruction lowers one)."""


@dataclass(frozen=True)
class SaeSpec:
    """One configuration of a sweep."""

    architecture: str = "relu"
    d_sae: int = 1024
    l1: float = 0.0
    """Sparsity coefficient λ: of the L1 penalty (relu) or the L0 penalty (jumprelu); with
    ``target_l0``, the coefficient the controller starts from."""
    target_l0: float | None = None
    """relu, jumprelu: steer λ during training so that a token fires about this many features."""
    k: int | None = None
    """Active latents a token (topk)."""
    seed: int = 0
    """Initialisation seed."""
    tied: bool = False
    """relu only: W_enc is W_decᵀ."""
    decoder_bias: bool = True
    l1_mode: str = "decoder_norm"
    """relu: weight the L1 by decoder-row norms, or keep rows at unit norm."""
    threshold: float = 0.1
    """jumprelu: initial threshold θ (inputs are scaled to E‖x‖² = d_in, so pre-activations
    start with unit scale). Low, so that training starts dense and the L0 penalty raises the
    thresholds: its straight-through gradient pushes them up well, while nothing but the
    reconstruction pulls a too-high threshold down (a controller asking for more L0 could not)."""
    bandwidth: float = 0.05
    """jumprelu: width ε of the straight-through kernel."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "topk" and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ValueError(f"topk needs 1 <= k <= d_sae, got k={self.k}")
        if self.architecture in ("relu", "jumprelu") and self.l1 < 0:
            raise ValueError("l1 must be >= 0")
        if self.architecture == "jumprelu" and not (self.threshold > 0 and self.bandwidth > 0):
            raise ValueError("jumprelu needs threshold > 0 and bandwidth > 0")
        if self.l1_mode not in ("decoder_norm", "unit_norm"):
            raise ValueError("l1_mode must be 'decoder_norm' or 'unit_norm'")
        if self.tied and self.architecture != "relu":
            raise ValueError("tied weights are for relu dictionaries")
        if self.target_l0 is not None:
            if self.architecture == "topk":
                raise ValueError("target_l0 is for relu and jumprelu; a topk dictionary's L0 is its k")
            if not 0 < self.target_l0 < self.d_sae:
                raise ValueError(f"target_l0 must be in (0, d_sae={self.d_sae}), got {self.target_l0}")
            if not self.l1 > 0:
                raise ValueError("with target_l0, l1 is the starting coefficient and must be positive")

    @property
    def unit_norm_decoder(self) -> bool:
        return self.architecture in ("topk", "jumprelu") or self.l1_mode == "unit_norm"

    def group_key(self) -> tuple:
        """Members that can be stacked together."""
        return (self.architecture, self.d_sae, self.tied, self.decoder_bias, self.l1_mode, self.bandwidth)

    def label(self) -> str:
        parts = [self.architecture, f"f{self.d_sae}"]
        if self.target_l0 is not None:
            parts.append(f"target{self.target_l0:g}")
        else:
            parts.append({"topk": f"k{self.k}", "jumprelu": f"l0-{self.l1:g}"}.get(self.architecture, f"l1-{self.l1:g}"))
        return "-".join(parts + ([f"s{self.seed}"] if self.seed else []))


def sweep_specs(architecture: str, d_sae: list[int], *, l1: list[float] | None = None, k: list[int] = (32,),
                seeds: list[int] = (0,), tied: bool = False, l1_mode: str = "decoder_norm",
                target_l0: list[float] | None = None) -> list[SaeSpec]:
    """Every combination of a sweep: sizes × seeds × (k values for topk; L1/L0 coefficients, or
    target L0s, for relu and jumprelu; ``l1`` defaults to 1). With targets, each member starts from
    the first ``l1``, or from :data:`TARGET_START`."""
    if target_l0 and architecture == "topk":
        raise ValueError("target_l0 is for relu and jumprelu; a topk dictionary's L0 is its k")
    specs = []
    for size, seed in itertools.product(d_sae, seeds):
        if architecture == "topk":
            specs += [SaeSpec("topk", size, k=value, seed=seed) for value in k]
            continue
        layout = dict(l1_mode=l1_mode) if architecture == "relu" else {}  # tied: SaeSpec refuses it for jumprelu
        if target_l0:
            start = l1[0] if l1 else TARGET_START
            specs += [SaeSpec(architecture, size, l1=start, target_l0=target, seed=seed, tied=tied, **layout)
                      for target in target_l0]
        else:
            specs += [SaeSpec(architecture, size, l1=value, seed=seed, tied=tied, **layout) for value in l1 or (1.0,)]
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
        if self.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.tensor([[s.threshold] for s in specs]).expand(-1, self.d_sae).clone())
            self.bandwidth = first.bandwidth

    @property
    def encoder(self) -> torch.Tensor:
        return self.W_dec.transpose(1, 2) if self.tied else self.W_enc  # (N, d, F)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, d)`` → ``(pre, f)``, each ``(N, B, F)``."""
        # b_dec's gradient through the encoder is −Σ_b ∂pre_b · W_encᵀ; taking it from a zero
        # valued (b_dec − b_dec.detach()) · W_enc term instead of from the centred input spares
        # autograd a (N, B, F) × (N, F, d) matmul for ∂centred. Values are unchanged (+0).
        centred = x.unsqueeze(0) - self.b_dec.detach().unsqueeze(1)  # (N, B, d), no gradient
        bias = self.b_enc.unsqueeze(1) - torch.bmm((self.b_dec - self.b_dec.detach()).unsqueeze(1), self.encoder)
        pre = torch.baddbmm(bias, centred, self.encoder)  # (N, B, F)
        if self.architecture == "relu":
            return pre, torch.relu(pre)
        if self.architecture == "jumprelu":
            return pre, JumpRelu.apply(pre, self.threshold, self.bandwidth)
        k_max = int(self.k.max())
        top = torch.relu(pre).topk(k_max, dim=-1)  # (N, B, k_max)
        keep = torch.arange(k_max, device=x.device) < self.k.view(-1, 1, 1)  # member n keeps its first k_n
        return pre, torch.zeros_like(pre).scatter(-1, top.indices, top.values * keep)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)  # (N, B, d)

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_coefficient: float = 1 / 32,
               total_variance: torch.Tensor | None = None, *, reference: bool = False,
               dtype: torch.dtype | None = None, cast: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Per-member losses and statistics on ``x (B, d)``; ``dead (N, F)`` bool.
        ``total_variance`` is Σ‖x − μ‖² of the whole batch when ``x`` is a slice of it.

        relu members use :class:`ReluLoss`, a forward and hand-written backward that touch
        the ``(N, B, F)`` activations a few times instead of autograd's dozen; topk members
        use :meth:`_topk_losses`, where only the one encoder matmul is dense;
        ``reference=True`` computes the same losses with plain dense autograd (the tests compare
        them). ``dtype`` is the matmuls' dtype in the fused path (bfloat16 on CUDA);
        ``cast`` is :meth:`matmul_weights` for it, when one step runs several slices."""
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        if self.architecture == "relu" and not reference:
            dtype = dtype or x.dtype
            loss, squared, active, totals, counts = ReluLoss.apply(
                x, None if self.tied else self.W_enc, self.W_dec, self.b_enc, self.b_dec, self.l1,
                not self.unit_norm, dtype, *(cast or self.matmul_weights(dtype)))
            mse = squared / (len(x) * self.d_in)
            return {"loss": loss, "aux": torch.zeros_like(loss), "mse": mse, "fvu": squared / total_variance,
                    "l0": active / len(x), "fired": counts > 0, "counts": counts}
        if self.architecture == "topk" and not reference:
            return self._topk_losses(x, dead, aux_coefficient, total_variance)
        pre, f = self.encode(x)
        reconstruction = self.decode(f)
        error = reconstruction - x.unsqueeze(0)  # (N, B, d)
        mse = error.pow(2).sum(-1).mean(-1) / self.d_in  # (N,)
        fvu = error.detach().pow(2).sum((-1, -2)) / total_variance  # (N,)
        if self.architecture == "relu":
            weights = self.W_dec.norm(dim=-1).unsqueeze(1) if not self.unit_norm else 1.0  # (N, 1, F)
            sparsity = self.l1 * (f * weights).sum(-1).mean(-1) / self.d_in  # (N,) a mean over tokens
            aux = torch.zeros_like(mse)
        elif self.architecture == "jumprelu":
            l0 = Step.apply(pre, self.threshold, self.bandwidth).sum(-1).mean(-1)  # (N,)
            sparsity = self.l1 * l0 / self.d_in
            aux = torch.zeros_like(mse)
        else:
            sparsity = torch.zeros_like(mse)
            aux = self._aux_loss(pre, error.detach(), dead, total_variance) * aux_coefficient  # a sum over tokens / TV
        # "loss" is a mean over these tokens, "aux" a sum over them divided by the whole batch's variance
        active = f.detach().sign()  # f >= 0: 1 where a latent fires (cheaper than f > 0 on CPUs)
        counts = active.sum(1)  # (N, F)
        return {"loss": mse + sparsity, "aux": aux, "mse": mse.detach(), "fvu": fvu,
                "l0": active.sum(-1).mean(-1), "fired": counts > 0, "counts": counts}

    def _topk_losses(self, x, dead, aux_coefficient, total_variance) -> dict:
        """topk losses with sparse gradients: the pre-activations are one dense matmul without
        autograd; only the selected ones (k a token, and AuxK's dead latents) are gathered back
        into the graph (:class:`GatheredPre`, gradients by ``index_add``), and decoding is an
        ``embedding_bag`` over the selected decoder rows. Same values and gradients as the
        dense formula, a fraction of its matmuls."""
        n, f_size = len(self.specs), self.d_sae
        with torch.no_grad():
            centred = x.unsqueeze(0) - self.b_dec.unsqueeze(1)  # (N, B, d)
            pre = torch.baddbmm(self.b_enc.unsqueeze(1), centred.to(self.encoder.dtype), self.encoder)  # (N, B, F)
            top = pre.topk(int(self.k.max()), dim=-1)  # (N, B, k_max)
        # b_dec enters the encoder as −b_dec·W_enc, a per-feature bias: its gradient comes from b_enc's
        bias = self.b_enc - torch.bmm((self.b_dec - self.b_dec.detach()).unsqueeze(1), self.encoder).squeeze(1)  # (N, F)
        keep = torch.arange(top.indices.shape[-1], device=x.device) < self.k.view(-1, 1, 1)  # member n keeps k_n
        acts = torch.relu(GatheredPre.apply(centred, self.encoder, bias, top.indices, top.values)) * keep  # (N, B, k)
        reconstruction = _sparse_decode(acts, top.indices, self.W_dec) + self.b_dec.unsqueeze(1)  # (N, B, d)
        error = reconstruction - x.unsqueeze(0)  # (N, B, d)
        mse = error.pow(2).sum(-1).mean(-1) / self.d_in  # (N,)
        fvu = error.detach().pow(2).sum((-1, -2)) / total_variance  # (N,)
        active = (acts.detach() > 0).to(pre.dtype)  # (N, B, k)
        counts = torch.zeros(n, f_size, device=x.device).scatter_add_(
            1, top.indices.view(n, -1), active.view(n, -1).float())  # (N, F) tokens each latent fired on (float32:
        # under autocast pre is bfloat16, which counts exactly only to 256)
        aux = torch.zeros_like(mse)
        if dead is not None and bool(dead.any()):
            n_dead = dead.sum(-1)  # (N,)
            k_aux = n_dead.clamp(max=self.d_in // 2)  # (N,) each member its own, as if trained alone
            with torch.no_grad():  # the dead latents' columns only: (N, D) with D the most dead in a member
                order = dead.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[:, : int(n_dead.max())]
                columns = order.unsqueeze(1).expand(-1, len(x), -1)  # (N, B, D)
                candidates = pre.gather(-1, columns)  # (N, B, D)
                candidates.masked_fill_(~dead.gather(-1, order).unsqueeze(1), -torch.inf)  # padding of fewer dead
                aux_top = candidates.topk(int(k_aux.max()), dim=-1)  # (N, B, k_aux)
                aux_indices = columns.gather(-1, aux_top.indices)  # feature indices
                aux_keep = (torch.arange(aux_top.indices.shape[-1], device=x.device) < k_aux.view(-1, 1, 1)) \
                    & torch.isfinite(aux_top.values)
            aux_acts = torch.relu(GatheredPre.apply(centred, self.encoder, bias, aux_indices,
                                                    pre.gather(-1, aux_indices))) * aux_keep  # (N, B, k_aux)
            predicted = _sparse_decode(aux_acts, aux_indices, self.W_dec)  # no bias: it predicts the residual
            scale = (n_dead.float() / k_aux.clamp(min=1)).clamp(max=1.0)
            aux = aux_coefficient * scale * (predicted + error.detach()).pow(2).sum((-1, -2)) / total_variance
        return {"loss": mse, "aux": aux, "mse": mse.detach(), "fvu": fvu, "l0": active.sum(-1).mean(-1),
                "fired": counts > 0, "counts": counts}

    @torch.no_grad()
    def matmul_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder (N, d, F), W_dec (N, F, d))`` in ``dtype``, cast once for a step's slices."""
        return self.encoder.to(dtype), self.W_dec.to(dtype)

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
        if self.architecture == "jumprelu":
            self.threshold.clamp_(min=1e-3)  # a threshold at or below 0 would let negative pre-activations through

    def member_weights(self, n: int) -> dict[str, torch.Tensor]:
        """Member ``n`` in the native key layout."""
        return {
            "W_enc": self.encoder[n].detach().clone(),
            "b_enc": self.b_enc[n].detach().clone(),
            "W_dec": self.W_dec[n].detach().clone(),
            "b_dec": self.b_dec[n].detach().clone(),
        } | ({"threshold": self.threshold[n].detach().clone()} if self.architecture == "jumprelu" else {})


class ReluLoss(torch.autograd.Function):
    """The relu members' loss, ``(‖x̂ − x‖² + λ Σ_i f_i w_i) / (B · d_in)`` a member, with
    ``w_i = ‖W_dec[i]‖`` (``weighted``) or 1, forward and backward written out.

    Autograd's version passes over the ``(N, B, F)`` activations about a dozen times (ReLU,
    the weighted L1 product and its gradient, threshold masks, firing counts); here the
    L1 term is summed over tokens first (``Σ_b f_bi`` a feature), its gradient rides along
    as the bias of the ``grad_f`` matmul, and the ReLU mask is applied once — so on a CPU,
    where a sweep of small dictionaries is bound by memory traffic, a step costs a fraction
    of autograd's. Returns ``(loss (N,), squared error (N,), active count (N,), Σ_b f (N, F), firing
    counts (N, F))``;
    only ``loss`` has a gradient. Matmuls run in ``dtype`` (``enc``/``dec``: the weights cast to it
    by :meth:`Ensemble.matmul_weights`, once a step); sums are float32.
    """

    @staticmethod
    def forward(ctx, x, w_enc, w_dec, b_enc, b_dec, l1, weighted: bool, dtype: torch.dtype, enc, dec):
        b, d = x.shape
        tied, acc = w_enc is None, torch.promote_types(dtype, torch.float32)  # sums in float32 or wider
        encoder = w_dec.transpose(1, 2) if tied else w_enc  # (N, d, F); enc, dec: it and w_dec in dtype
        centred = (x.unsqueeze(0) - b_dec.unsqueeze(1)).to(dtype)  # (N, B, d)
        f = torch.baddbmm(b_enc.unsqueeze(1).to(dtype), centred, enc).clamp_min_(0)  # (N, B, F)
        error = torch.baddbmm(b_dec.unsqueeze(1).to(dtype), f, dec).to(acc).sub_(x)  # x̂ − x, (N, B, d)
        squared = error.pow(2).sum((1, 2))  # (N,)
        # Reductions over (N, B, F) accumulate in float32 either way; a bfloat16 f keeps bfloat16
        # outputs (Σ over tokens a feature, firing count a token) rather than converting f whole.
        totals = f.sum(1).to(acc)  # (N, F)
        counts = torch.sign(f).sum(1, dtype=acc)  # (N, F) tokens each feature fired on (f >= 0: sign is the indicator)
        active = counts.sum(-1)  # (N,)
        norms = w_dec.norm(dim=-1) if weighted else None  # (N, F)
        penalty = (totals * norms).sum(-1) if weighted else totals.sum(-1)
        ctx.save_for_backward(centred, f, error, dec, encoder, w_dec, totals, norms, l1)
        ctx.tied, ctx.weighted, ctx.dtype, ctx.scale = tied, weighted, dtype, 1.0 / (b * d)
        ctx.mark_non_differentiable(squared, active, totals, counts)
        return (squared + l1 * penalty) * ctx.scale, squared, active, totals, counts

    @staticmethod
    def backward(ctx, grad_loss, *_):
        centred, f, error, dec, encoder, w_dec, totals, norms, l1 = ctx.saved_tensors
        n, dtype = len(grad_loss), ctx.dtype
        acc = torch.promote_types(dtype, torch.float32)
        g = grad_loss * ctx.scale  # (N,)
        g_l1 = g * l1  # (N,)
        grad_error = error * (2 * g).view(n, 1, 1)  # (N, B, d)
        grad_error_mm = grad_error.to(dtype)
        # ∂/∂f = grad_error · W_decᵀ + λ g w   (the L1 gradient is the matmul's bias)
        bias = (g_l1.view(n, 1) * norms if ctx.weighted else g_l1.view(n, 1).expand(n, f.shape[-1])).unsqueeze(1)
        grad_pre = torch.baddbmm(bias.to(dtype), grad_error_mm, dec.transpose(1, 2))  # (N, B, F)
        grad_pre = torch.ops.aten.threshold_backward.grad_input(grad_pre, f, 0, grad_input=grad_pre)  # ReLU mask
        grad_w_dec = torch.bmm(f.transpose(1, 2), grad_error_mm).to(acc)  # (N, F, d)
        if ctx.weighted:  # ∂‖w_i‖/∂w_i = w_i / ‖w_i‖
            grad_w_dec += (g_l1.view(n, 1) * totals / norms.clamp(min=1e-12)).unsqueeze(-1) * w_dec
        grad_b_enc = grad_pre.sum(1).to(acc)  # (N, F)
        grad_enc = torch.bmm(centred.transpose(1, 2), grad_pre).to(acc)  # (N, d, F)
        grad_b_dec = None
        if ctx.needs_input_grad[4]:  # x̂ adds b_dec; the encoder subtracts it
            grad_b_dec = grad_error.sum(1) - torch.bmm(grad_b_enc.unsqueeze(1), encoder.transpose(1, 2)).squeeze(1)
        if ctx.tied:
            grad_w_dec += grad_enc.transpose(1, 2)
            grad_enc = None
        return None, grad_enc, grad_w_dec, grad_b_enc, grad_b_dec, None, None, None, None, None


def _sparse_decode(acts: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """``Σ_j acts[n, b, j] · W_dec[n, indices[n, b, j]]`` → ``(N, B, d)``: one ``embedding_bag``
    over the members' stacked decoder rows."""
    n, b, k = acts.shape
    f_size, d = w_dec.shape[1:]
    rows = (indices + torch.arange(n, device=indices.device).view(n, 1, 1) * f_size).view(n * b, k)
    out = torch.nn.functional.embedding_bag(rows, w_dec.reshape(n * f_size, d), mode="sum",
                                            per_sample_weights=acts.reshape(n * b, k).to(w_dec.dtype))
    return out.view(n, b, d)


class GatheredPre(torch.autograd.Function):
    """The pre-activations ``centred · W_enc + bias`` at ``indices (N, B, j)``, their values
    computed already (``values``); the gradient goes to ``W_enc`` and ``bias`` only at those
    columns, by ``index_add`` (``centred`` carries none: b_dec's part is in ``bias``)."""

    @staticmethod
    def forward(ctx, centred, encoder, bias, indices, values):
        ctx.save_for_backward(centred, indices)
        ctx.encoder_shape = encoder.shape
        return values.to(encoder.dtype)

    @staticmethod
    def backward(ctx, grad_values):
        centred, indices = ctx.saved_tensors
        n, d, f_size = ctx.encoder_shape
        acc = torch.promote_types(grad_values.dtype, torch.float32)  # sums in float32 or wider
        grad_values = grad_values.to(acc)
        flat = (indices + torch.arange(n, device=indices.device).view(n, 1, 1) * f_size).reshape(-1)  # (N·B·j,)
        grad_bias = grad_values.new_zeros(n * f_size).index_add_(0, flat, grad_values.reshape(-1))
        rows = (grad_values.unsqueeze(-1) * centred.to(acc).unsqueeze(2)).reshape(-1, d)  # (N·B·j, d)
        grad_encoder_t = rows.new_zeros(n * f_size, d).index_add_(0, flat, rows)  # (N·F, d)
        return None, grad_encoder_t.view(n, f_size, d).transpose(1, 2), grad_bias.view(n, f_size), None, None


def _kernel(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Rectangle kernel ``K((pre − θ)/ε) / ε``: 1/ε within ε/2 of the threshold, else 0."""
    return ((pre - threshold.unsqueeze(1)).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class JumpRelu(torch.autograd.Function):
    """``f = pre · H(pre − θ)`` over ``pre (N, B, F)`` and ``θ (N, F)``. The gradient to
    ``pre`` is ``H`` (the jump ignored); to ``θ`` it is the straight-through estimate
    ``−θ · K((pre − θ)/ε) / ε`` times the incoming gradient, summed over tokens."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        gate = pre > threshold.unsqueeze(1)
        ctx.save_for_backward(pre, threshold, gate)
        ctx.bandwidth = bandwidth
        return pre * gate

    @staticmethod
    def backward(ctx, grad_f):
        pre, threshold, gate = ctx.saved_tensors
        grad_threshold = -(threshold.unsqueeze(1) * _kernel(pre, threshold, ctx.bandwidth) * grad_f).sum(1)
        return grad_f * gate, grad_threshold, None


class Step(torch.autograd.Function):
    """``H(pre − θ)``, the firing indicator an L0 penalty counts; no gradient to ``pre``, and to
    ``θ`` the straight-through estimate ``−K((pre − θ)/ε) / ε`` times the incoming gradient."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold.unsqueeze(1)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_step):
        pre, threshold = ctx.saved_tensors
        return None, -(_kernel(pre, threshold, ctx.bandwidth) * grad_step).sum(1), None
