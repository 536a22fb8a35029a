"""``steerserve eval``: what a dictionary, and optionally a set of edits, costs in next-token loss.

    steerserve eval --dictionary pythia-tiny-l2 [--edit DICT:FEATURE:OP[:VALUE]]... [--tokens N] [--json]
    steerserve eval --dictionary pythia-tiny-l2 --edit pythia-tiny-l2:77:ablate --target " list"   # edit effect
    steerserve eval --dictionary pythia-tiny-l2 --feature 77        # one feature's effect and logit lens

The report has CE and KL of the clean / spliced / zero-ablated / edited runs, SAEBench's core
metrics of the dictionary and, with edits, what the edits do (target effect) and cost
beside it (side effect), with standard errors.
"""

from __future__ import annotations

import json
import os
import sys


def _load(args):
    from dictionaries.statistics import max_activations
    from dictionaries.store import DictionaryStore
    from dictionaries.vectors import VectorStore
    from editing.edits import dictionaries_named, parse_edit, vectors_named
    from editing.model import load_model

    store = DictionaryStore()
    edits = [parse_edit(text) for text in args.edit or []]
    names = {args.dictionary} | dictionaries_named(edits)
    configs = {name: store.config(name) for name in names}
    model = args.model or configs[args.dictionary].model_name or "pythia-tiny"
    loaded = load_model(model, device=args.device, progress=True)
    dictionaries = {name: store.load(name, device=args.device) for name in names}
    resources = {"vectors": {name: VectorStore().load(name) for name in vectors_named(edits)},
                 "feature_max": {name: maxima for name in names
                                 if (maxima := max_activations(store.path(name))) is not None}}
    return store, loaded, dictionaries, edits, resources


def _remote(args, kind: str, start) -> int:
    """Submit a job to ``--server``; with ``--wait``, show its progress until it ends."""
    from clients.client import Client

    client = Client(args.server, api_key=args.api_key)
    job = start(client)
    print(f"{kind[:-1]} job {job['id']} queued on {args.server}")
    if not args.wait:
        print(f"follow it with: curl {args.server}/v1/{kind}/{job['id']}")
        return 0

    def show(record: dict) -> None:
        print(f"\r  {record['status']:<10} {100 * record['progress']:5.1f}%  {record.get('message') or ''}"[:100].ljust(100),
              end="", flush=True)

    record = client.wait(kind, job["id"], on_progress=show)
    print()
    if record["status"] != "succeeded":
        print(f"error: the job ended {record['status']}: {record.get('error') or ''}", file=sys.stderr)
        return 1
    if args.json or kind == "trainings":
        print(json.dumps(record["result"], indent=2)[:20000])
    return 0


def _eval(args) -> int:
    if args.server:
        from clients.serve_commands import _edit_dict

        return _remote(args, "evaluations", lambda client: client.evaluate(
            args.dictionary, edits=[_edit_dict(e) for e in args.edit or []], corpus=args.corpus, tokens=args.tokens,
            model=args.model, target_tokens=args.target or []))
    from tqdm.auto import tqdm

    from editing.evaluate import evaluate, feature_effect

    store, loaded, dictionaries, edits, resources = _load(args)
    if args.feature is not None:
        effect = feature_effect(loaded, dictionaries, args.dictionary, args.feature, corpus=args.corpus,
                                tokens=args.tokens)
        print(json.dumps(effect, indent=2))
        return 0
    bar = tqdm(total=1.0, desc=f"eval {args.dictionary}", bar_format="{l_bar}{bar}| {postfix}", disable=args.json)

    def progress(fraction: float, message: str) -> None:
        bar.n = fraction
        bar.set_postfix_str(message)

    report = evaluate(loaded, dictionaries, args.dictionary, edits=edits, corpus=args.corpus, tokens=args.tokens,
                      progress=progress, targets=args.target or None, **resources)
    bar.close()
    if args.write_metrics:
        metrics = store.info(args.dictionary)["metrics"] or {}
        from editing.core_metrics import flat

        metrics.update({**flat(report["core"]), "core": report["core"],
                        "ce_loss_recovered": report["ce_loss_recovered"]["mean"],
                        "kl_spliced": report["kl"]["spliced"]["mean"],
                        "ce_clean": report["ce"]["clean"]["mean"], "ce_spliced": report["ce"]["spliced"]["mean"],
                        "ce_zero": report["ce"]["zero"]["mean"], "evaluation": report})
        store.write_file(args.dictionary, "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.dictionary} at {report['hook']}: {report['tokens']} tokens of {report['corpus']} "
          f"({report['windows']} windows of {report['context_length']})")
    print(f"  {'run':<9} {'CE (nats)':>18} {'perplexity':>11}")
    for name in ("clean", "spliced", "zero", "edited"):
        ce = report["ce"][name]
        print(f"  {name:<9} {ce['mean']:>10.4f} ± {ce['se']:.4f} {ce['perplexity']:>11.2f}"
              + ("   (no edits)" if name == "edited" and not edits else ""))
    rows = [("CE loss recovered", report["ce_loss_recovered"]), ("KL clean‖spliced", report["kl"]["spliced"]),
            ("KL clean‖edited", report["kl"]["edited"]), ("fvu", report["fvu"]), ("l0", report["l0"])]
    for label, value in rows:
        print(f"  {label:<18} {value['mean']:>10.4f} ± {value['se']:.4f}")
    print(f"  {'dead fraction':<18} {report['dead_fraction']:>10.4f}   (over {report['dead_window_tokens']} tokens)")
    _print_core(report["core"])
    if "edit_effect" in report:
        _print_effect(report["edit_effect"])
    print(f"  {report['tokens_per_second']:.0f} tokens/s")
    return 0


def _print_core(core: dict) -> None:
    print("  SAEBench core metrics")
    for label, key in (("KL score", "kl_div_score"), ("cosine(x, x̂)", "cossim"), ("L2 ratio", "l2_ratio"),
                       ("recon. bias", "relative_reconstruction_bias"), ("L1", "l1")):
        print(f"    {label:<16} {core[key]['mean']:>10.4f} ± {core[key]['se']:.4f}")
    print(f"    {'alive':<16} {core['frac_alive']:>10.4f}   firing on >1%: {core['freq_over_1_percent']:.4f}, "
          f">10%: {core['freq_over_10_percent']:.4f}")
    histogram = core["log_density_histogram"]
    edges, counts = histogram["edges"], histogram["counts"]
    peak = max(counts) or 1
    print(f"    log10 density    (dead: {histogram['dead']})")
    for lo, hi, count in zip(edges, edges[1:], counts):
        if count:
            print(f"    [{lo:5.1f}, {hi:4.1f})  {count:>6}  {'#' * max(1, round(30 * count / peak))}")


def _print_effect(effect: dict) -> None:
    targets = ", ".join(repr(t["token"]) for t in effect["targets"])
    print(f"  edit effect        targets {targets} ({effect['targets_from']})")
    target, side = effect["target_effect"], effect["side_effect"]
    print(f"    target effect    {target['mean']:>+10.4f} ± {target['se']:.4f} nats at {target['positions']} aimed positions")
    other = side["kl_other_positions"]
    print(f"    KL other pos.    {other['mean']:>10.3e} ± {other['se']:.1e} at {other['positions']} positions; "
          f"ΔCE {side['delta_ce_other_positions']['mean']:+.3e}")
    print(f"    KL held-out      {side['kl_heldout']['mean']:>10.3e} ± {side['kl_heldout']['se']:.1e}; "
          f"ΔCE {side['delta_ce_heldout']['mean']:+.3e} ± {side['delta_ce_heldout']['se']:.1e}")
    ratio = effect["ratio"]
    print(f"    ratio            {'-' if ratio is None else f'{ratio:10.2f}'} (|target effect| / KL at other positions)")


def add_commands(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate a dictionary (and edits) by next-token loss")
    parser.add_argument("--dictionary", required=True)
    parser.add_argument("--edit", action="append", help="DICT:FEATURE:OP[:VALUE] or vector:NAME:VALUE, with "
                        "[@positions][,unit=max|norm][,when=DICT:FEATURE>T]; repeatable")
    parser.add_argument("--target", action="append", help="a target token of the edit effect (one token, e.g. ' list'), "
                        "repeatable; default: the edited features' top logit-lens tokens")
    parser.add_argument("--feature", type=int, help="report one feature's ablation effect and logit lens instead")
    parser.add_argument("--corpus", default="builtin:pydocs/heldout",
                        help="locally a corpus spec; with --server a corpus the server exposes, by name")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--model", help="default: the model the dictionary was trained on (with --server: a served model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-metrics", action="store_true", help="store the results in the dictionary's metrics.json")
    parser.add_argument("--server", help="run it as a job on this server instead of here")
    parser.add_argument("--wait", action="store_true", help="with --server: show progress until the job ends")
    parser.add_argument("--api-key", default=os.environ.get("STEERSERVE_API_KEY"))
    parser.set_defaults(handler=_eval)
