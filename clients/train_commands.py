"""``steerserve train``: train dictionaries offline (a sweep in one pass) and publish them.

    steerserve train --model pythia-tiny --hook blocks.2.hook_resid_post --arch relu --d-sae 1024 \\
                     --l1 1,3 --tokens 2000000 --name l2-relu [--resume] [--cache]
    steerserve train --default          # the default pythia-tiny dictionary that `make serve` uses

Comma-separated ``--l1``, ``--k``, ``--d-sae``, ``--seeds`` and ``--target-l0`` make a sweep:
every combination is trained together on one activation stream and stored as ``NAME-<label>``.
``--target-l0 40`` (relu, jumprelu) steers the sparsity coefficient during training so that
the dictionary ends near that L0, starting from the first ``--l1``.
"""

from __future__ import annotations

import os
import sys


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _train(args) -> int:
    if args.server:
        from clients.eval_commands import _remote

        if args.default or not (args.hook and args.name):
            print("error: with --server, give --hook and --name (the default dictionary is trained locally)",
                  file=sys.stderr)
            return 2
        settings = {"name": args.name, "model": args.model, "hook": args.hook, "architecture": args.arch,
                    "d_sae": _ints(args.d_sae), "l1": _floats(args.l1) if args.l1 else None, "k": _ints(args.k or "32"),
                    "target_l0": _floats(args.target_l0) if args.target_l0 else None,
                    "seeds": _ints(args.seeds), "tokens": args.tokens, "corpus": args.corpus,
                    "heldout_corpus": args.heldout_corpus, "batch_size": args.batch_size,
                    "learning_rate": args.lr, "context_length": args.context_length, "seed": args.seed,
                    "dtype": args.dtype, "deploy": args.deploy}
        return _remote(args, "trainings", lambda client: client.train(**settings))
    from dictionaries.training.ensemble import sweep_specs
    from dictionaries.training.pipeline import DEFAULT_NAME, default_config, train_and_publish
    from dictionaries.training.trainer import TrainConfig
    from editing.corpora import CorpusError
    from editing.model import load_model

    if args.default:
        config, name, model = default_config(), DEFAULT_NAME, "pythia-tiny"
    else:
        missing = [flag for flag, value in (("--hook", args.hook), ("--name", args.name)) if not value]
        if missing:
            print(f"error: {' and '.join(missing)} required (or use --default)", file=sys.stderr)
            return 2
        try:
            specs = sweep_specs(args.arch, _ints(args.d_sae), l1=_floats(args.l1) if args.l1 else None, k=_ints(args.k or "32"),
                                seeds=_ints(args.seeds), tied=args.tied, l1_mode=args.l1_mode,
                                target_l0=_floats(args.target_l0) if args.target_l0 else None)
            config = TrainConfig(hook=args.hook, specs=tuple(specs), tokens=args.tokens, corpus=args.corpus,
                                 heldout_corpus=args.heldout_corpus, context_length=args.context_length,
                                 batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, cache=args.cache,
                                 checkpoint_every=args.checkpoint_every, dtype=args.dtype)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        name, model = args.name, args.model
    loaded = load_model(model, device=args.device)
    try:
        published = train_and_publish(loaded, config, name=name, resume=args.resume, progress=True)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'name':<36} {'fvu':>7} {'l0':>7} {'dead':>6} {'coefficient':>11}   "
          f"(held-out, {published[0]['metrics']['dead_window_tokens']} tokens of {published[0]['metrics']['heldout_corpus']})")
    for entry in published:
        m = entry["metrics"]
        coefficient = f"{entry['coefficient']:>11.4g}" if entry["coefficient"] is not None else f"{'':>11}"
        print(f"{entry['name']:<36} {m['fvu']:>7.4f} {m['l0']:>7.2f} {m['dead_fraction']:>6.1%} {coefficient}")
    return 0


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="train dictionaries and publish them to the store")
    train.add_argument("--default", action="store_true", help="train the default pythia-tiny dictionary")
    train.add_argument("--model", default="pythia-tiny")
    train.add_argument("--hook", help="e.g. blocks.2.hook_resid_post")
    train.add_argument("--arch", choices=("relu", "topk", "jumprelu"), default="relu")
    train.add_argument("--d-sae", default="1024", help="features; comma-separated for a sweep")
    train.add_argument("--l1", help="sparsity coefficients, comma-separated (default 1; with --target-l0 the start, "
                                    "default 0.01): L1 for relu, L0 for jumprelu")
    train.add_argument("--k", help="topk active features, comma-separated (default 32)")
    train.add_argument("--target-l0", help="relu/jumprelu: L0s to train to, comma-separated; the coefficient is "
                                           "steered during training, starting from the first --l1 (default 0.01)")
    train.add_argument("--seeds", default="0", help="initialisation seeds, comma-separated")
    train.add_argument("--tied", action="store_true", help="relu: tie W_enc to W_decᵀ")
    train.add_argument("--l1-mode", choices=("decoder_norm", "unit_norm"), default="decoder_norm")
    train.add_argument("--tokens", type=int, default=2_000_000)
    train.add_argument("--corpus", default="builtin:pydocs/train",
                       help="without a split, trains on CORPUS#train and measures on CORPUS#heldout")
    train.add_argument("--heldout-corpus", help="corpus for the held-out metrics (default: the corpus's held-out split)")
    train.add_argument("--context-length", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=4096)
    train.add_argument("--lr", type=float, help="Adam's rate (default at 4096 features: 4e-3 relu/jumprelu, 1.3e-2 topk; scaled as 1/sqrt(d_sae))")
    train.add_argument("--seed", type=int, default=0, help="data order and resampling")
    train.add_argument("--checkpoint-every", type=int, help="tokens between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument("--cache", action="store_true", help="cache activations on disk and reuse them")
    train.add_argument("--device", default="cpu")
    train.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="matmul precision (auto: bfloat16 on CUDA, float32 on CPU)")
    train.add_argument("--name", help="store name (sweep members get NAME-<label>)")
    train.add_argument("--server", help="run it as a job on this server instead of here")
    train.add_argument("--wait", action="store_true", help="with --server: show progress until the job ends")
    train.add_argument("--deploy", action="store_true", help="with --server: serve the result when it succeeds")
    train.add_argument("--api-key", default=os.environ.get("STEERSERVE_API_KEY"))
    train.add_argument("--json", action="store_true", help="with --server --wait: print the job's result as JSON")
    train.set_defaults(handler=_train)
