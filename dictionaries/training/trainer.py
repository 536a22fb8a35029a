"""Train a sweep of dictionaries on one activation stream, with checkpoints and resume.

    config = TrainConfig(hook="blocks.2.hook_resid_post", tokens=2_000_000,
                         specs=(SaeSpec("relu", 1024, l1=1.0), SaeSpec("relu", 1024, l1=3.0)))
    result = Trainer(loaded, config, run_dir).run()

Members of one architecture and size form one stacked :class:`Ensemble`; all ensembles
consume the same batches. Adam with a linear warm-up and a final linear decay, both fractions
of the run, at a rate that scales as 1/√d_sae unless one is given; the sparsity coefficient
(relu, jumprelu) warms up from 0 too, and members with a ``target_l0`` have it steered by an
:class:`~dictionaries.training.schedule.L0Controller`. Dead features are those that did not fire in the last ``dead_window`` tokens; ``relu``
members have them resampled (encoder and decoder re-initialised towards badly
reconstructed inputs, their Adam state reset) every ``resample_every`` tokens during the
first half of training; :func:`revive` keeps topk and relu latents from going silent (a
latent that fires rarely has its encoder bias raised), and topk members have the AuxK loss. With
``dtype="bfloat16"`` (the default on CUDA) the matmuls run in bfloat16 (autocast, or the
fused relu loss's own casts); weights, Adam state and sums stay float32.

A checkpoint (weights, Adam state, dead counters, firing rates, sparsity coefficients, the resampling RNG
and the data position) is written every ``checkpoint_every`` tokens and at the end of the
run as safetensors + JSON, atomically; ``resume`` continues from it and ends with the same
weights as an uninterrupted run; resuming a finished run trains nothing and returns its
weights (so publishing can be retried without training again).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from dictionaries.training.activations import ActivationSource, ActivationSpec
from dictionaries.training.ensemble import Ensemble, SaeSpec
from dictionaries.training.schedule import (ADAM_BETAS, L0Controller, learning_rate, scaled_learning_rate,
                                           sparsity_warmup)


@dataclass(frozen=True)
class TrainConfig:
    hook: str
    specs: tuple[SaeSpec, ...]
    tokens: int = 2_000_000
    corpus: str = "builtin:pydocs/train"
    context_length: int = 128
    batch_size: int = 4096
    learning_rate: float | None = None
    """Adam's rate; None: 4e-3 (relu, jumprelu) or 1.3e-2 (topk) at 4096 features, scaled as
    1/√d_sae for each size (schedule.BASE_RATES)."""
    adam_betas: tuple[float, float] | None = None
    """Adam's (β1, β2); None: (0.8, 0.999) for topk, (0.9, 0.999) otherwise (schedule.ADAM_BETAS)."""
    warmup: float = 0.05
    """Fraction of the run over which the learning rate warms up linearly."""
    decay: float = 0.2
    """Final fraction of the run over which the learning rate decays linearly to 0."""
    sparsity_warmup: float = 0.05
    """Fraction of the run over which the L1/L0 coefficient ramps up from 0 (relu, jumprelu)."""
    controller_gain: float = 0.1
    """Integral gain of the target-L0 controller (members with target_l0); see schedule.L0Controller."""
    controller_damping: float = 1.0
    """Its damping (proportional) gain."""
    heldout_corpus: str | None = None
    """Corpus for the published held-out metrics; None: the training corpus's held-out split."""
    dead_window: int = 250_000
    """Tokens without firing after which a feature counts as dead."""
    resample_every: int | None = 200_000
    """Tokens between dead-feature resamplings (relu; only in the first half of training)."""
    aux_coefficient: float = 1 / 32
    revive_step: float | None = None
    """After each batch, a latent whose firing rate (an average over about the last five batches)
    is under ``revive_below`` of its member's mean rate (k/d_sae for topk, L0/d_sae of the batch
    for relu) has its encoder bias raised by this much (in the scaled input's units), so it does
    not go silent; 0 turns it off. None: :data:`REVIVE_STEPS` (topk 0.015, relu 0.001, jumprelu
    off). See the README's "Why these defaults"."""
    revive_below: float = 0.125
    member_tokens: int = 4096
    """Work size of one stacked step: a batch is processed in slices of member_tokens / N
    tokens with gradients accumulated (same result, far better cache use on CPUs)."""
    checkpoint_every: int | None = None
    """Tokens between checkpoints (None: none)."""
    seed: int = 0
    """Data order and resampling."""
    cache: bool = False
    """Cache the activations on disk and reuse them."""
    dtype: str = "auto"
    """Matmul precision: "float32", "bfloat16", or "auto" (bfloat16 on CUDA, float32 elsewhere).
    Weights, Adam state and sums stay float32; bfloat16 on a CPU pays only where the CPU has
    bfloat16 dot-product instructions (AVX512-BF16, AMX)."""

    def __post_init__(self):
        if not self.specs:
            raise ValueError("a training run needs at least one configuration")
        if self.batch_size <= 0 or self.tokens < self.batch_size:
            raise ValueError("tokens must be at least one batch")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("warmup", "decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a fraction of the run, in [0, 1]; got {getattr(self, name)}")
        if self.adam_betas is not None and (len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.warmup + self.decay > 1:
            raise ValueError("warmup + decay must not exceed the whole run")


@dataclass
class TrainResult:
    ensembles: list[Ensemble]
    specs: list[list[SaeSpec]]
    scale: float
    """Input scale: activations were multiplied by it (E‖x‖² = d_in)."""
    tokens_seen: int
    dead: list[torch.Tensor] = field(default_factory=list)  # (N, F) bool per ensemble
    coefficients: list[torch.Tensor] = field(default_factory=list)
    """(N,) per ensemble: each member's final sparsity coefficient (the controller's, for a target_l0)."""
    log: list[dict] = field(default_factory=list)


class Trainer:
    """``source``: activations to train on instead of running ``loaded`` (anything with ``d_in``
    and ``batches(batch_size, skip=)``, e.g. :class:`TensorActivations`); ``loaded`` may then be None."""

    def __init__(self, loaded, config: TrainConfig, run_dir: Path | str, *, source=None):
        self.loaded = loaded
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = next(loaded.model.parameters()).device if loaded is not None else torch.device("cpu")
        self.source = source or ActivationSource(loaded, ActivationSpec(
            hook=config.hook, tokens=config.tokens, corpus=config.corpus, context_length=config.context_length,
            seed=config.seed), cache=config.cache)
        self.d_in = self.source.d_in
        bfloat16 = config.dtype == "bfloat16" or (config.dtype == "auto" and self.device.type == "cuda")
        self.matmul_dtype = torch.bfloat16 if bfloat16 else torch.float32
        groups: dict[tuple, list[SaeSpec]] = {}
        for spec in config.specs:
            groups.setdefault(spec.group_key(), []).append(spec)
        self.groups = list(groups.values())

    # --- schedule -----------------------------------------------------------------------------

    def total_steps(self) -> int:
        return math.ceil(self.config.tokens / self.config.batch_size)

    def base_learning_rate(self, ensemble: Ensemble) -> float:
        return self.config.learning_rate or scaled_learning_rate(ensemble.d_sae, ensemble.architecture)

    def learning_rate(self, step: int, ensemble: Ensemble) -> float:
        return learning_rate(step, self.total_steps(), self.base_learning_rate(ensemble), self.config.warmup,
                             self.config.decay)

    def _adam(self, ensemble: Ensemble) -> torch.optim.Adam:
        betas = self.config.adam_betas or ADAM_BETAS[ensemble.architecture]
        return torch.optim.Adam(ensemble.parameters(), lr=self.base_learning_rate(ensemble), betas=tuple(betas))

    def _revive_step(self, ensemble: Ensemble) -> float:
        step = self.config.revive_step
        return REVIVE_STEPS[ensemble.architecture] if step is None else step

    def _controllers(self) -> list[L0Controller]:
        return [L0Controller([s.l1 for s in specs], [s.target_l0 for s in specs], gain=self.config.controller_gain,
                             damping=self.config.controller_damping) for specs in self.groups]

    # --- the run ------------------------------------------------------------------------------------

    def run(self, *, resume: bool = False, progress: Callable[[int, dict], None] | None = None) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        batches = None
        state = self._load_checkpoint() if resume else None
        if state is None:
            batches = self.source.batches(self.config.batch_size)
            first = next(batches).to(self.device)
            scale = float((self.d_in / first.pow(2).sum(-1).mean()).sqrt())
            ensembles = [Ensemble(specs, self.d_in, b_dec_init=(first * scale).mean(0).cpu()).to(self.device)
                         for specs in self.groups]
            optimizers = [self._adam(e) for e in ensembles]
            since_fired = [torch.zeros(len(s), s[0].d_sae, device=self.device) for s in self.groups]
            rates = [_mean_rates(e) for e in ensembles]
            controllers = self._controllers()
            generator = torch.Generator().manual_seed(self.config.seed + 1)
            step, pending = 0, [first]
            log_file = (self.run_dir / "log.jsonl").open("w")
        else:
            ensembles, optimizers, since_fired, rates, controllers, generator, step, scale = state
            batches = self.source.batches(self.config.batch_size, skip=step) if step < self.total_steps() else iter(())
            pending = []
            log_file = (self.run_dir / "log.jsonl").open("a")

        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.matmul_dtype == torch.bfloat16 \
            else _nullcontext()
        checkpoint_every = self.config.checkpoint_every
        tokens_seen = step * self.config.batch_size
        log = []
        started = time.time()
        try:
            for raw in _chain(pending, batches):
                x = raw.to(self.device) * scale  # (B, d)
                warm = sparsity_warmup(step, self.total_steps(), self.config.sparsity_warmup)
                stats = []
                for ensemble, optimizer, counter, rate, controller in zip(ensembles, optimizers, since_fired, rates,
                                                                          controllers):
                    dead = counter >= self.config.dead_window
                    lr = self.learning_rate(step, ensemble)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    ensemble.l1.copy_(controller.coefficient * warm)
                    optimizer.zero_grad(set_to_none=True)
                    out = self._accumulate_gradients(ensemble, x, dead, autocast)
                    ensemble.constrain_before_step()
                    optimizer.step()
                    ensemble.constrain_after_step()
                    counter.add_(len(x)).masked_fill_(out["fired"], 0)
                    revive(ensemble, rate, out["counts"] / len(x), self._revive_step(ensemble), self.config.revive_below)
                    if warm >= 1.0:  # steer once the coefficient has warmed up
                        controller.update(out["l0"])
                    stats.append({k: out[k].float().tolist() for k in ("loss", "mse", "fvu", "l0")}
                                 | {"dead": (counter >= self.config.dead_window).float().mean(-1).tolist(),
                                    "coefficient": ensemble.l1.tolist()})
                step += 1
                tokens_seen += len(x)
                resampled = 0
                if self.config.resample_every and tokens_seen <= self.config.tokens // 2 and \
                        tokens_seen // self.config.resample_every != (tokens_seen - len(x)) // self.config.resample_every:
                    for ensemble, optimizer, counter in zip(ensembles, optimizers, since_fired):
                        if ensemble.architecture == "relu":
                            dead = counter >= self.config.dead_window
                            resampled += resample_dead(ensemble, optimizer, dead, x, generator)
                            counter.masked_fill_(dead, 0)  # a resampled feature gets a new window
                keys = ("loss", "mse", "fvu", "l0", "dead", "coefficient")
                record = {"step": step, "tokens": tokens_seen, "lr": lr, "seconds": round(time.time() - started, 3),
                          "resampled": resampled,
                          "members": [dict(zip(keys, values)) for s in stats for values in zip(*(s[k] for k in keys))]}
                log.append(record)
                log_file.write(json.dumps(record) + "\n")
                if progress is not None:
                    progress(len(x), record)
                if checkpoint_every and tokens_seen // checkpoint_every != (tokens_seen - len(x)) // checkpoint_every:
                    self._save_checkpoint(ensembles, optimizers, since_fired, rates, controllers, generator, step, scale)
        finally:
            log_file.close()
        if state is None or log:  # the finished run, kept until its dictionaries are published
            self._save_checkpoint(ensembles, optimizers, since_fired, rates, controllers, generator, step, scale)
        dead = [counter >= min(self.config.dead_window, tokens_seen) for counter in since_fired]
        return TrainResult(ensembles=ensembles, specs=self.groups, scale=scale, tokens_seen=tokens_seen, dead=dead,
                           coefficients=[c.coefficient.float() for c in controllers], log=log)

    def _accumulate_gradients(self, ensemble: Ensemble, x: torch.Tensor, dead: torch.Tensor, autocast) -> dict:
        total_variance = (x - x.mean(0)).pow(2).sum()
        size = max(1, self.config.member_tokens // len(ensemble.specs))
        cast = ensemble.matmul_weights(self.matmul_dtype) if ensemble.architecture == "relu" else None
        totals: dict = {}
        for piece in x.split(size):
            weight = len(piece) / len(x)
            if ensemble.architecture == "relu":  # the fused loss casts its matmuls itself
                out = ensemble.losses(piece, None, total_variance=total_variance, dtype=self.matmul_dtype, cast=cast)
            else:
                with autocast:
                    out = ensemble.losses(piece, dead, self.config.aux_coefficient, total_variance)
            (out["loss"].sum() * weight + out["aux"].sum()).backward()
            totals["loss"] = totals.get("loss", 0) + out["loss"].detach() * weight + out["aux"].detach()
            for key in ("mse", "l0"):
                totals[key] = totals.get(key, 0) + out[key].detach() * weight
            totals["counts"] = totals.get("counts", 0) + out["counts"]
            totals["fvu"] = totals.get("fvu", 0) + out["fvu"]  # already divided by the whole batch's variance
        totals["fired"] = totals["counts"] > 0
        return totals

    # --- checkpoints ------------------------------------------------------------------------------------

    def _save_checkpoint(self, ensembles, optimizers, since_fired, rates, controllers, generator, step, scale) -> None:
        tensors: dict[str, torch.Tensor] = {"generator": generator.get_state()}
        adam_steps = {}
        for g, (ensemble, optimizer, counter, rate, controller) in enumerate(
                zip(ensembles, optimizers, since_fired, rates, controllers)):
            tensors[f"g{g}.since_fired"] = counter
            tensors[f"g{g}.firing_rate"] = rate
            tensors[f"g{g}.coefficient"] = controller.coefficient
            tensors[f"g{g}.previous_error"] = controller.previous_error
            for name, param in ensemble.named_parameters():
                tensors[f"g{g}.param.{name}"] = param.detach()
                state = optimizer.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        tensors[f"g{g}.adam.{name}.{key}"] = state[key]
                if "step" in state:
                    adam_steps[f"g{g}.{name}"] = float(state["step"])
        meta = {"step": step, "scale": scale, "adam_steps": adam_steps, "config": _jsonable(asdict(self.config))}
        staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=self.run_dir))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "state.safetensors"))
        (staging / "state.json").write_text(json.dumps(meta, indent=2))
        target = self.run_dir / "checkpoint"
        old = self.run_dir / f".checkpoint.old-{time.time_ns()}"
        if target.exists():
            target.rename(old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self):
        target = self.run_dir / "checkpoint"
        if not (target / "state.json").is_file():
            return None
        meta = json.loads((target / "state.json").read_text())
        if meta["config"] != _jsonable(asdict(self.config)):
            raise ValueError(f"{target}: the checkpoint was written by a run with different settings; "
                             "resume with the same arguments, or start over without --resume")
        tensors = load_file(str(target / "state.safetensors"))
        ensembles, optimizers, since_fired, rates, controllers = [], [], [], [], self._controllers()
        for g, specs in enumerate(self.groups):
            ensemble = Ensemble(specs, self.d_in).to(self.device)
            with torch.no_grad():
                for name, param in ensemble.named_parameters():
                    param.copy_(tensors[f"g{g}.param.{name}"])
            optimizer = self._adam(ensemble)
            for name, param in ensemble.named_parameters():
                if f"g{g}.{name}" in meta["adam_steps"]:
                    optimizer.state[param] = {
                        "step": torch.tensor(meta["adam_steps"][f"g{g}.{name}"]),
                        "exp_avg": tensors[f"g{g}.adam.{name}.exp_avg"].to(self.device),
                        "exp_avg_sq": tensors[f"g{g}.adam.{name}.exp_avg_sq"].to(self.device),
                    }
            ensembles.append(ensemble)
            optimizers.append(optimizer)
            since_fired.append(tensors[f"g{g}.since_fired"].to(self.device))
            rates.append(tensors[f"g{g}.firing_rate"].to(self.device))
            controllers[g].coefficient = tensors[f"g{g}.coefficient"]
            controllers[g].previous_error = tensors[f"g{g}.previous_error"]
        generator = torch.Generator()
        generator.set_state(tensors["generator"])
        return ensembles, optimizers, since_fired, rates, controllers, generator, meta["step"], meta["scale"]


RATE_DECAY = 0.8
"""Per batch, of the firing-rate average :func:`revive` keeps (about the last five batches)."""
REVIVE_STEPS = {"topk": 0.015, "relu": 0.001, "jumprelu": 0.0}
""":func:`revive`'s step by architecture (measured with ``bench/quality.py``; see the README)."""


def _topk_mean_rate(ensemble: Ensemble) -> torch.Tensor:
    """``(N, 1)``: the rate at which a topk member's latents fire on average, k/F."""
    return ensemble.k.float().view(-1, 1) / ensemble.d_sae


def _mean_rates(ensemble: Ensemble) -> torch.Tensor:
    """``(N, F)``: the firing-rate averages a run starts with: k/F for topk, unset (NaN: the
    first batch's rates are taken as they are) otherwise."""
    if ensemble.architecture == "topk":
        return _topk_mean_rate(ensemble).expand(-1, ensemble.d_sae).clone()
    return torch.full((len(ensemble.specs), ensemble.d_sae), torch.nan)


@torch.no_grad()
def revive(ensemble: Ensemble, rate: torch.Tensor, batch_rate: torch.Tensor, step: float, below: float) -> None:
    """Fold the batch's firing rates ``(N, F)`` into ``rate`` (in place) and raise the encoder
    bias of latents that fire at under ``below`` of their member's mean rate by ``step`` (the
    mean: k/F for topk, the batch's L0/F otherwise).

    A topk latent dies by losing the competition for the top k, not by a negative
    pre-activation (measured: the dead latents' pre-activations peak at 0.39, live ones' at
    0.59), and once it stops being selected it gets no gradient to win it back; a relu latent
    whose pre-activation stays below 0 gets none either. The raised bias puts it back among
    the active ones for some inputs; its decoder row and encoder then learn from them (the
    load-balancing bias of auxiliary-loss-free MoE routers, applied to the encoder bias itself,
    so the encode function is unchanged). Each member's latents depend on its own rates only,
    so a sweep member still equals the same run alone."""
    rate.copy_(torch.where(rate.isnan(), batch_rate, rate * RATE_DECAY + batch_rate * (1 - RATE_DECAY)))
    if step <= 0:
        return
    if ensemble.architecture == "topk":
        mean = _topk_mean_rate(ensemble)
    else:
        mean = batch_rate.mean(-1, keepdim=True)  # (N, 1): the batch's L0 / F
    ensemble.b_enc.add_((rate < below * mean).to(ensemble.b_enc.dtype), alpha=step)


@torch.no_grad()
def resample_dead(ensemble: Ensemble, optimizer: torch.optim.Optimizer, dead: torch.Tensor, x: torch.Tensor,
                  generator: torch.Generator) -> int:
    """Re-initialise dead relu features towards inputs the member reconstructs worst."""
    if not bool(dead.any()):
        return 0
    _, f = ensemble.encode(x)
    errors = (ensemble.decode(f) - x.unsqueeze(0)).pow(2).sum(-1)  # (N, B)
    resampled = 0
    for n in range(len(ensemble.specs)):
        features = dead[n].nonzero().squeeze(-1)
        if not len(features):
            continue
        weights = errors[n].cpu().double() + 1e-12
        picks = torch.multinomial(weights, len(features), replacement=True, generator=generator).to(x.device)
        directions = x[picks] - ensemble.b_dec[n]  # (|D|, d)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive = ~dead[n]
        encoder_norm = ensemble.encoder[n][:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        scale_dec = 1.0 if ensemble.unit_norm else float(ensemble.W_dec[n][alive].norm(dim=-1).mean()) if bool(alive.any()) else 0.1
        ensemble.W_dec[n, features] = directions * scale_dec
        if not ensemble.tied:
            ensemble.W_enc[n][:, features] = (directions * 0.2 * encoder_norm).T
        ensemble.b_enc[n, features] = 0.0
        for param, index in ((ensemble.W_dec, (n, features)), (ensemble.b_enc, (n, features))) + \
                (((ensemble.W_enc, (n, slice(None), features)),) if not ensemble.tied else ()):
            state = optimizer.state.get(param)
            if state:
                state["exp_avg"][index] = 0.0
                state["exp_avg_sq"][index] = 0.0
        resampled += len(features)
    return resampled


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _chain(first: list, rest):
    yield from first
    yield from rest


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))
