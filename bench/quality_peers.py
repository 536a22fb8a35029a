"""Train one SAELens or sparsify dictionary on given activations, offline; run by bench/quality.py
in the peers' own venv (it imports neither steerserve nor anything that reaches a hub).

    bench/.peers-venv/bin/python bench/quality_peers.py --library saelens --arch topk --k 32 \\
        --tokens 400000 --batch-size 4096 --activations acts.safetensors --probe probe.safetensors --out DIR

Batch ``i`` is rows ``[i·B, (i+1)·B)`` of the activations, modulo their count: the batches
steerserve's ``TensorActivations`` serves our trainer. Each library trains with its own
defaults (SAELens: ``LanguageModelSAERunnerConfig``'s trainer settings; sparsify:
``TrainConfig``'s), only the dictionary size, k or L1 coefficient, batch and token count set.

Writes ``DIR/weights.safetensors`` in one plain layout (``W_enc [d, F]``, ``b_enc [F]``,
``W_dec [F, d]``, ``b_dec [d]``, ``shift [d]`` subtracted from the input before ``W_enc``),
``DIR/probe.safetensors`` (the library's own encode of the probe inputs, taken from the trained
module before anything is folded) and ``DIR/meta.json`` (seconds of training, versions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def batches(activations: torch.Tensor, tokens: int, batch_size: int):
    for start in range(0, tokens, batch_size):
        rows = torch.arange(start, min(start + batch_size, tokens)) % len(activations)
        yield activations[rows].float()


def train_saelens(args, activations: torch.Tensor, probe: torch.Tensor):
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = activations.shape[1]
    if args.arch == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k)
        sae = TopKTrainingSAE(sae_cfg)
    else:
        sae_cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, l1_coefficient=args.l1)
        sae = StandardTrainingSAE(sae_cfg)
    runner = LanguageModelSAERunnerConfig(sae=sae_cfg, training_tokens=args.tokens,
                                          train_batch_size_tokens=args.batch_size, device="cpu",
                                          logger=LoggingConfig(log_to_wandb=False))
    trainer_cfg = runner.to_sae_trainer_config()
    provider = batches(activations, args.tokens, args.batch_size)
    started = time.perf_counter()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider).fit()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        probe_features = sae.encode(probe)
        if args.arch == "topk" and sae.cfg.rescale_acts_by_decoder_norm:
            sae.fold_W_dec_norm()  # the library's own fold: plain W_enc/W_dec with the same features
        shift = sae.b_dec if sae.cfg.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)
        weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, "shift": shift}
    settings = {"lr": trainer_cfg.lr, "lr_warm_up_steps": trainer_cfg.lr_warm_up_steps,
                "lr_scheduler": trainer_cfg.lr_scheduler_name, "dead_feature_window": trainer_cfg.dead_feature_window,
                "normalize_activations": sae_cfg.normalize_activations}
    return weights, probe_features, seconds, {"sae-lens": version("sae-lens")}, settings


class _Lookup(torch.nn.Module):
    """Stands in for a transformer layer: token ids index rows of the activation table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids % len(self.table)]


class _TableModel(torch.nn.Module):
    """The smallest "model" sparsify's Trainer accepts: one layer whose output is the activations
    of the token ids it is given, so its hook sees exactly the rows of our batches."""

    def __init__(self, table: torch.Tensor, sequence: int):
        super().__init__()
        from types import SimpleNamespace

        self.layers = torch.nn.ModuleList([_Lookup(table)])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
        self.sequence = sequence

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids):
        return self.layers[0](input_ids)


def train_sparsify(args, activations: torch.Tensor, probe: torch.Tensor):
    from sparsify import SaeConfig, Trainer, TrainConfig

    if args.arch != "topk":
        raise SystemExit("sparsify trains topk (and groupmax) sparse coders only; no L1/relu")
    steps = args.tokens // args.batch_size
    # one "sequence" of batch_size ids a step: row indices of the batches above
    dataset = [{"input_ids": torch.arange(i * args.batch_size, (i + 1) * args.batch_size)} for i in range(steps)]
    model = _TableModel(activations, args.batch_size)
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(SaeConfig(num_latents=args.d_sae, k=args.k), batch_size=1, layers=[0],
                          log_to_wandb=False, save_dir=save_dir, save_every=10**9)
        trainer = Trainer(cfg, dataset, model)
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    for optimizer in trainer.optimizers:  # schedule-free: the averaged weights, as sparsify saves them
        if hasattr(optimizer, "eval"):
            optimizer.eval()
    sae = next(iter(trainer.saes.values()))
    with torch.no_grad():
        out = sae.encode(probe)
        probe_features = torch.zeros(len(probe), sae.num_latents).scatter_(-1, out.top_indices, out.top_acts)
        weights = {"W_enc": sae.encoder.weight.T, "b_enc": sae.encoder.bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
                   "shift": sae.b_dec}
    lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
    settings = {"optimizer": cfg.optimizer, "lr": lr, "auxk_alpha": cfg.auxk_alpha,
                "dead_feature_threshold": cfg.dead_feature_threshold}
    return weights, probe_features, seconds, {"eai-sparsify": version("eai-sparsify")}, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=("saelens", "sparsify"), required=True)
    parser.add_argument("--arch", choices=("topk", "relu"), required=True)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1", type=float, default=1.0)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", required=True)
    parser.add_argument("--probe", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    activations = load_file(args.activations)["activations"]
    probe = load_file(args.probe)["activations"]
    train = train_saelens if args.library == "saelens" else train_sparsify
    weights, probe_features, seconds, versions, settings = train(args, activations, probe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().clone().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    save_file({"features": probe_features.detach().float().contiguous()}, str(out / "probe.safetensors"))
    meta = {"library": args.library, "arch": args.arch, "d_sae": args.d_sae, "k": args.k if args.arch == "topk" else None,
            "l1": args.l1 if args.arch == "relu" else None, "tokens": args.tokens, "batch_size": args.batch_size,
            "seconds": seconds, "versions": versions | {"torch": torch.__version__}, "settings": settings}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
