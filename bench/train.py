"""Training throughput: one dictionary, an 8-configuration sweep in one pass, and the same 8
configurations as 8 sequential runs — measured side by side in one run.

    .venv/bin/python bench/train.py [--models pythia-tiny pythia-70m-shape] [--tokens 200000] [--device cpu]
                                    [--dtypes float32 bfloat16]

Each run is a whole training run as a user starts it (activations from the model, no
activation cache): sequential runs each make their own activations, the sweep makes them
once and trains the 8 relu dictionaries (L1 coefficients 0.5 … 64, 1024 features) as one
stacked module. Prints tokens/s and the sweep's speed-up over the 8 sequential runs, for each
matmul precision asked for (the trainer's ``dtype``; bfloat16 pays on CPUs with bfloat16
dot-product instructions).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench_models import load_bench_model  # bench/bench_models.py (a script's own folder is on sys.path)

from dictionaries.training.ensemble import SaeSpec
from dictionaries.training.trainer import TrainConfig, Trainer

L1S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def timed_run(loaded, specs, tokens: int, hook: str, dtype: str) -> float:
    config = TrainConfig(hook=hook, specs=tuple(specs), tokens=tokens, batch_size=4096, learning_rate=1e-3, dtype=dtype)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        Trainer(loaded, config, run_dir).run()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pythia-tiny", "pythia-70m-shape"])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.tokens} tokens a run, "
          f"relu dictionaries of 1024 features, L1 sweep {L1S}")
    print(f"{'model':<18} {'dtype':<9} {'1 dict tok/s':>13} {'sweep tok/s':>12} {'sweep s':>8} {'8 runs s':>9} "
          f"{'speed-up':>9}")
    for name in args.models:
        loaded = load_bench_model(name, args.device)
        hook = f"blocks.{loaded.model.config.num_hidden_layers // 2 - 1}.hook_resid_post"
        specs = [SaeSpec("relu", 1024, l1=l1) for l1 in L1S]
        from editing.corpora import open_corpus

        list(open_corpus("builtin:pydocs/train").documents())  # parse the stdlib once, outside the timings
        for dtype in args.dtypes:
            single = timed_run(loaded, specs[:1], args.tokens, hook, dtype)
            sweep = timed_run(loaded, specs, args.tokens, hook, dtype)
            sequential = sum(timed_run(loaded, [spec], args.tokens, hook, dtype) for spec in specs)
            print(f"{name:<18} {dtype:<9} {args.tokens / single:>13.0f} {args.tokens / sweep:>12.0f} {sweep:>8.1f} "
                  f"{sequential:>9.1f} {sequential / sweep:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
