"""How a run's learning rate and sparsity coefficients move over its steps.

    lr = learning_rate(step, total_steps, base, warmup=0.05, decay=0.2)   # linear warm-up, linear decay to 0
    base = scaled_learning_rate(d_sae, "relu")                          # 4e-3 at 4096 features, ∝ 1/√d_sae
    factor = sparsity_warmup(step, total_steps, 0.05)                    # the L1/L0 coefficient ramps up from 0

Warm-up and decay are fractions of the run, so a run of 200 steps and one of 20,000 get
the same shape (a fixed 50-step warm-up was a quarter of a short run).

:class:`L0Controller` steers the sparsity coefficient of members that ask for a target L0,
on the L0 of the batch just trained on: with ``e = log(L0 / target)``, after every step
``log λ += gain·e + damping·(e − e_previous)`` (a PI controller in velocity form, in log
space), so a member that fires too often gets a stronger penalty and one that fires too
little a weaker one, and the damping term brakes while L0 is already moving towards the
target (L0 follows λ with a lag of some steps; an integral term alone overshoots).
Each member's coefficient depends on its own L0 only, so a sweep member still equals the
same run alone.
"""

from __future__ import annotations

import math

import torch

REFERENCE_LATENTS = 2**12
"""The size at which :func:`scaled_learning_rate` returns its base rate."""


def learning_rate(step: int, total: int, base: float, warmup: float, decay: float) -> float:
    """Linear warm-up over the first ``warmup`` of the run, constant, then a linear decay to 0
    over the last ``decay`` of it (both fractions of ``total`` steps)."""
    warmup_steps = max(1, round(total * warmup))
    decay_start = min(total - 1, total - round(total * decay))
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if step >= decay_start and decay > 0:
        return base * (total - step) / max(1, total - decay_start)
    return base


BASE_RATES = {"relu": 4e-3, "jumprelu": 4e-3, "topk": 1.3e-2}
"""Adam's rate at :data:`REFERENCE_LATENTS` features, by architecture (measured with
``bench/quality.py``; topk trains at over 3× relu's rate now that :func:`~dictionaries.training.trainer.revive`
keeps its latents alive there)."""

ADAM_BETAS = {"relu": (0.9, 0.999), "jumprelu": (0.9, 0.999), "topk": (0.8, 0.999)}
"""Adam's (β1, β2) by architecture. topk takes β1 0.8: a latent that stops being selected gets
no gradient, and Adam's momentum keeps moving it the way it was going, out of the top k; with
the other defaults β1 0.95 left 37% of the latents dead, 0.9 2.5%, 0.8 0.24% (``bench/quality.py``'s
data). relu keeps torch's 0.9 (0.8 cost it FVU at the same L0)."""


def scaled_learning_rate(d_sae: int, architecture: str = "relu") -> float:
    """Adam's rate for a dictionary of ``d_sae`` features: the architecture's base rate at 4096,
    ∝ 1/√d_sae (as sparsify scales it): a wider dictionary has more decoder rows pulling on
    each direction."""
    return BASE_RATES[architecture] / math.sqrt(d_sae / REFERENCE_LATENTS)


def sparsity_warmup(step: int, total: int, fraction: float) -> float:
    """Factor on the sparsity coefficient: linear from 0 over the first ``fraction`` of the run."""
    steps = round(total * fraction)
    return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


class L0Controller:
    """Per-member sparsity coefficients ``(N,)``; members with a target L0 are steered to it.

    ``gain`` is the exponent of the multiplicative update and ``max_change`` bounds one
    step's factor (``e^±max_change``), so one odd batch cannot throw the coefficient far."""

    def __init__(self, coefficients: list[float], targets: list[float | None], *, gain: float = 0.1,
                 damping: float = 1.0, max_change: float = 0.2):
        self.coefficient = torch.tensor(coefficients, dtype=torch.float64)  # (N,)
        self.target = torch.tensor([math.nan if t is None else t for t in targets], dtype=torch.float64)  # (N,)
        self.previous_error = torch.full_like(self.target, math.nan)  # (N,) nan: no step yet
        self.gain, self.damping, self.max_change = gain, damping, max_change

    @property
    def active(self) -> bool:
        return bool(torch.isfinite(self.target).any())

    def update(self, measured_l0: torch.Tensor) -> None:
        """One step of the controller on each member's measured L0 ``(N,)``."""
        controlled = torch.isfinite(self.target)
        if not bool(controlled.any()):
            return
        error = (measured_l0.detach().double().cpu().clamp(min=1e-3) / self.target.nan_to_num(1.0)).log()  # (N,)
        change = self.gain * error + self.damping * (error - self.previous_error).nan_to_num(0.0)
        step = change.clamp(-self.max_change, self.max_change)
        self.coefficient = torch.where(controlled, self.coefficient * step.exp(), self.coefficient)
        self.previous_error = torch.where(controlled, error, self.previous_error)
