"""Dictionary quality against SAELens and sparsify: the same activations, one evaluator.

    .venv/bin/python bench/quality.py --setup-peers          # once: bench/.peers-venv (CPU torch first, then the peers)
    .venv/bin/python bench/quality.py [--tokens 614400] [--views tokens time frontier]

Activations of pythia-tiny at ``blocks.1.hook_resid_post`` (``builtin:pydocs/train``,
seeded window order, token-shuffled) are computed once and written to
``bench/.quality/activations.safetensors``; every trainer gets exactly the same batches
(batch ``i`` is rows ``[i·B, (i+1)·B)``, cycled). Our trainer runs in this process; SAELens
and sparsify run in their own venv (``bench/quality_peers.py``), each with its own defaults,
offline: they are fed the activations, never a model or data set from a hub.

One evaluator, plain torch and none of the libraries' classes, scores every dictionary on
held-out windows of ``builtin:pydocs/heldout``: FVU, L0, dead fraction (over those tokens),
CE recovered and KL(clean‖spliced) with the dictionary's reconstruction spliced in at the
hook, next to the tokens and wall time of training. Each library's own encode (ours
included) is checked against the evaluator's on real held-out activations.

Views:
- equal tokens: topk k=32 (ours, SAELens, sparsify); relu: SAELens at ``--saelens-l1`` and
  ours asked for SAELens's measured L0 (``target_l0``), so the two sit at matched L0;
- equal wall time: each trainer's tokens/s is that of its equal-token run; each then trains
  for the tokens it does in the seconds the slowest needed for the equal-token budget;
- frontier: FVU against L0 for a sweep: ours as one stacked run (topk over ``--frontier-k``;
  relu asked for each SAELens member's L0), the peers as sequential runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the project, when run as a script

from dictionaries.training.activations import ActivationSource, ActivationSpec, TensorActivations  # noqa: E402
from dictionaries.training.ensemble import TARGET_START, SaeSpec  # noqa: E402
from dictionaries.training.publish import member_dictionary  # noqa: E402
from dictionaries.training.trainer import TrainConfig, Trainer  # noqa: E402
from editing.corpora import open_corpus, token_windows  # noqa: E402
from editing.model import load_model  # noqa: E402

HOOK, LAYER = "blocks.1.hook_resid_post", 1
PEERS_VENV = HERE / ".peers-venv"
PEER_PACKAGES = ("sae-lens==6.54.12", "eai-sparsify==1.3.3")


# --- the evaluator: plain tensors in, metrics out --------------------------------------------

@dataclass
class Plain:
    """A dictionary as plain tensors: ``f = act((x·scale − shift)·W_enc + b_enc)``,
    ``x̂ = (f·W_dec + b_dec)/scale``; ``act`` relu, topk (the k largest of ReLU) or jumprelu."""

    arch: str
    W_enc: torch.Tensor  # (d, F)
    b_enc: torch.Tensor  # (F,)
    W_dec: torch.Tensor  # (F, d)
    b_dec: torch.Tensor  # (d,)
    shift: torch.Tensor  # (d,)
    scale: float = 1.0
    k: int | None = None
    threshold: torch.Tensor | None = None  # (F,)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x * self.scale - self.shift) @ self.W_enc + self.b_enc  # (T, F)
        if self.arch == "relu":
            return pre.clamp(min=0)
        if self.arch == "jumprelu":
            return pre * (pre > self.threshold)
        top = pre.clamp(min=0).topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) / self.scale


def _layer(model):
    return model.gpt_neox.layers[LAYER]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, dictionary: Plain, batch: int = 16) -> dict:
    """FVU, L0, dead fraction, CE clean/spliced/zero, CE recovered, KL on the held-out windows."""
    sums = dict(error=0.0, l0=0.0, ce_clean=0.0, ce_spliced=0.0, ce_zero=0.0, kl=0.0)
    fired = torch.zeros(dictionary.W_dec.shape[0], dtype=torch.bool)
    count, predicted, x_sum, x_sq = 0, 0, 0.0, 0.0
    replace = {}

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = replace["fn"](hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = _layer(model).register_forward_hook(hook)
    try:
        for start in range(0, len(windows), batch):
            ids = windows[start : start + batch]
            captured = {}

            def keep(hidden):
                captured["x"] = hidden.float()
                return hidden

            replace["fn"] = keep
            clean = model(input_ids=ids).logits.float().log_softmax(-1)  # (b, T, V)
            x = captured["x"].reshape(-1, captured["x"].shape[-1])  # (b·T, d)
            f = dictionary.encode(x)
            x_hat = dictionary.decode(f)
            replace["fn"] = lambda hidden: x_hat.view_as(hidden).to(hidden.dtype)
            spliced = model(input_ids=ids).logits.float().log_softmax(-1)
            replace["fn"] = lambda hidden: torch.zeros_like(hidden)
            zero = model(input_ids=ids).logits.float().log_softmax(-1)
            targets = ids[:, 1:].unsqueeze(-1)
            for name, logp in (("ce_clean", clean), ("ce_spliced", spliced), ("ce_zero", zero)):
                sums[name] -= float(logp[:, :-1].gather(-1, targets).sum())
            sums["kl"] += float((clean.exp() * (clean - spliced)).sum())
            sums["error"] += float((x_hat - x).double().pow(2).sum())
            sums["l0"] += float((f > 0).sum())
            fired |= (f > 0).any(0)
            x_sum = x_sum + x.double().sum(0)
            x_sq += float(x.double().pow(2).sum())
            count += len(x)
            predicted += targets.numel()
    finally:
        handle.remove()
    variance = x_sq - float(x_sum.pow(2).sum()) / count
    ce = {name: sums[name] / predicted for name in ("ce_clean", "ce_spliced", "ce_zero")}
    return {"fvu": sums["error"] / variance, "l0": sums["l0"] / count, "dead": float((~fired).float().mean()),
            "ce_recovered": (ce["ce_zero"] - ce["ce_spliced"]) / (ce["ce_zero"] - ce["ce_clean"]),
            "kl": sums["kl"] / count, **ce, "eval_tokens": count}


def encode_check(dictionary: Plain, probe: torch.Tensor, library_features: torch.Tensor) -> float:
    """Largest |f_library − f_evaluator| over the probe, relative to the largest activation."""
    ours = dictionary.encode(probe)
    return float((ours - library_features).abs().max() / ours.abs().max().clamp(min=1e-12))


# --- the trainers ------------------------------------------------------------------------------

def train_ours(activations: torch.Tensor, specs: list[SaeSpec], tokens: int, batch_size: int, probe: torch.Tensor):
    """Our trainer on the activations; each member as a :class:`Plain`, its own encode of the probe."""
    config = TrainConfig(hook=HOOK, specs=tuple(specs), tokens=tokens, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = Trainer(None, config, run_dir, source=TensorActivations(activations, tokens)).run()
        seconds = time.perf_counter() - started
    members = []
    for ensemble, coefficients in zip(result.ensembles, result.coefficients):
        for n, spec in enumerate(ensemble.specs):
            native = member_dictionary(ensemble, n, result.scale, hook=HOOK, model_name="bench", model_sha256="",
                                       provenance={})
            w = ensemble.member_weights(n)
            plain = Plain(spec.architecture, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], shift=w["b_dec"],
                          scale=result.scale, k=spec.k, threshold=w.get("threshold"))
            with torch.no_grad():
                features = native.encode(probe)
            members.append((spec, plain, features, float(coefficients[n])))
    return members, seconds


def train_peer(library: str, arch: str, *, tokens: int, batch_size: int, d_sae: int, k: int | None, l1: float | None,
               workdir: Path, name: str, reuse: bool):
    """A peer's dictionary; with ``reuse``, a run of the same settings finished after the activations
    were written is loaded instead of trained again (its recorded seconds are those of that run)."""
    out = workdir / "runs" / name
    if reuse and _finished_run(out, library=library, arch=arch, tokens=tokens, batch_size=batch_size, d_sae=d_sae,
                               k=k if arch == "topk" else None, l1=l1 if arch == "relu" else None,
                               after=workdir / "activations.safetensors"):
        return _load_peer(out, arch, k)
    command = [str(PEERS_VENV / "bin" / "python"), str(HERE / "quality_peers.py"), "--library", library,
               "--arch", arch, "--d-sae", str(d_sae), "--tokens", str(tokens), "--batch-size", str(batch_size),
               "--activations", str(workdir / "activations.safetensors"), "--probe", str(workdir / "probe.safetensors"),
               "--out", str(out), "--threads", str(torch.get_num_threads())]
    command += ["--k", str(k)] if arch == "topk" else ["--l1", str(l1)]
    done = subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                                                                        "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise RuntimeError(f"{library} {arch} failed:\n{done.stderr[-3000:]}")
    return _load_peer(out, arch, k)


def _finished_run(out: Path, *, after: Path, **settings) -> bool:
    meta_file = out / "meta.json"
    if not meta_file.is_file() or meta_file.stat().st_mtime < after.stat().st_mtime:
        return False
    meta = json.loads(meta_file.read_text())
    return all(meta.get(key) == value for key, value in settings.items())


def _load_peer(out: Path, arch: str, k: int | None):
    w = load_file(str(out / "weights.safetensors"))
    meta = json.loads((out / "meta.json").read_text())
    plain = Plain(arch, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], shift=w["shift"], k=k)
    return plain, load_file(str(out / "probe.safetensors"))["features"], meta


# --- the benchmark ------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loaded = load_model("pythia-tiny", progress=False)
        self.model = self.loaded.model.eval()
        self.activations = self._activations()
        self.windows = token_windows(open_corpus("builtin:pydocs/heldout"), self.loaded.tokenizer, 128,
                                     max_windows=args.heldout_windows)  # (W, 128)
        self.probe = self._probe()
        self.rows = []
        self.peer_runs = {}  # (library, arch, setting, tokens) → row: a frontier point trained for another view is reused

    def _activations(self) -> torch.Tensor:
        path = self.workdir / "activations.safetensors"
        unique = self.args.tokens
        if path.is_file():
            cached = load_file(str(path))["activations"]
            if len(cached) == unique:
                return cached
        source = ActivationSource(self.loaded, ActivationSpec(hook=HOOK, tokens=unique, seed=0))
        activations = torch.cat(list(source.batches(self.args.batch_size)))  # (unique, d)
        save_file({"activations": activations.contiguous()}, str(path))
        return activations

    @torch.no_grad()
    def _probe(self) -> torch.Tensor:
        captured = []
        handle = _layer(self.model).register_forward_hook(
            lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).float()))
        try:
            self.model(input_ids=self.windows[:16])
        finally:
            handle.remove()
        probe = captured[0].reshape(-1, captured[0].shape[-1])  # (2048, d)
        save_file({"activations": probe.contiguous()}, str(self.workdir / "probe.safetensors"))
        return probe

    def record(self, view: str, trainer: str, arch: str, plain: Plain, features, *, tokens: int, seconds: float,
               setting: str, members_in_run: int = 1) -> dict:
        metrics = evaluate(self.model, self.windows, plain)
        row = {"view": view, "trainer": trainer, "arch": arch, "setting": setting, "tokens": tokens,
               "seconds": seconds, "members_in_run": members_in_run,
               "encode_check": encode_check(plain, self.probe, features), **metrics}
        self.rows.append(row)
        print(f"{view:<9} {trainer:<9} {arch:<5} {setting:<22} fvu {row['fvu']:.4f}  l0 {row['l0']:6.1f}  "
              f"dead {row['dead']:6.1%}  CE rec {row['ce_recovered']:.4f}  KL {row['kl']:.4f}  "
              f"{tokens:>8} tok  {seconds:6.1f} s  encode Δ {row['encode_check']:.1e}", flush=True)
        return row

    def peer(self, view, library, arch, *, tokens, k=None, l1=None):
        setting = f"k={k}" if arch == "topk" else f"l1={l1:g}"
        key = (library, arch, setting, tokens)
        if key in self.peer_runs:
            row = {**self.peer_runs[key], "view": view}
            self.rows.append(row)
            print(f"{view:<9} {library:<9} {arch:<5} {setting:<22} the same run as in the {self.peer_runs[key]['view']} view",
                  flush=True)
            return row
        plain, features, meta = train_peer(library, arch, tokens=tokens, batch_size=self.args.batch_size,
                                           d_sae=self.args.d_sae, k=k, l1=l1, workdir=self.workdir,
                                           name=f"{library}-{arch}-{k or l1}-{tokens}", reuse=self.args.reuse_peers)
        row = self.record(view, library, arch, plain, features, tokens=tokens, seconds=meta["seconds"], setting=setting)
        self.peer_runs[key] = row
        return row

    def ours(self, view, specs: list[SaeSpec], *, tokens):
        members, seconds = train_ours(self.activations, specs, tokens, self.args.batch_size, self.probe)
        rows = []
        for spec, plain, features, coefficient in members:
            setting = f"k={spec.k}" if spec.architecture == "topk" else \
                f"target {spec.target_l0:.0f}, λ={coefficient:.3g}" if spec.target_l0 else f"λ={spec.l1:g}"
            rows.append(self.record(view, "ours", spec.architecture, plain, features, tokens=tokens, seconds=seconds,
                                    setting=setting, members_in_run=len(specs)))
        return rows

    # --- views --------------------------------------------------------------------------------

    def equal_tokens(self) -> dict:
        a, tokens = self.args, self.args.tokens
        runs = {"topk": [self.ours("tokens", [SaeSpec("topk", a.d_sae, k=a.k)], tokens=tokens)[0]]}
        runs["topk"] += [self.peer("tokens", lib, "topk", tokens=tokens, k=a.k) for lib in a.peers
                         if lib in ("saelens", "sparsify")]
        runs["relu"] = []
        if "saelens" in a.peers:
            saelens = self.peer("tokens", "saelens", "relu", tokens=tokens, l1=a.saelens_l1)
            runs["relu"] = [saelens]
            target = saelens["l0"]
        else:
            target = a.k
        runs["relu"].insert(0, self.ours("tokens", [SaeSpec("relu", a.d_sae, l1=TARGET_START, target_l0=target)],
                                         tokens=tokens)[0])
        return runs

    def equal_time(self, runs: dict) -> None:
        """Each trainer's tokens/s is that of its own equal-token run (the whole training call, so
        a peer's start-up counts as it does for a user, spread over the run as ours is); each then
        trains for the tokens it does in the seconds the slowest took, which keeps its own run."""
        a = self.args
        for arch, rows in runs.items():
            speed = {row["trainer"]: row["tokens"] / row["seconds"] for row in rows}
            budget = a.tokens / min(speed.values())  # the slowest's own seconds
            print(f"time      {arch}: tokens/s " + ", ".join(f"{t} {v:,.0f}" for t, v in speed.items()) +
                  f" (their equal-token runs); {budget:.0f} s each", flush=True)
            for row in rows:
                tokens = max(a.batch_size, int(speed[row["trainer"]] * budget // a.batch_size) * a.batch_size)
                if tokens <= row["tokens"]:
                    self.rows.append({**row, "view": "time"})
                    continue
                if row["trainer"] == "ours":
                    self.ours("time", [self._spec(arch, runs)], tokens=tokens)
                else:
                    self.peer("time", row["trainer"], arch, tokens=tokens, k=a.k if arch == "topk" else None,
                              l1=a.saelens_l1 if arch == "relu" else None)

    def _spec(self, arch: str, runs: dict) -> SaeSpec:
        if arch == "topk":
            return SaeSpec("topk", self.args.d_sae, k=self.args.k)
        return SaeSpec("relu", self.args.d_sae, l1=TARGET_START, target_l0=runs["relu"][-1]["l0"])

    def frontier(self) -> None:
        a, tokens = self.args, self.args.tokens
        self.ours("frontier", [SaeSpec("topk", a.d_sae, k=k) for k in a.frontier_k], tokens=tokens)
        for lib in a.frontier_peers:
            for k in a.frontier_k:
                self.peer("frontier", lib, "topk", tokens=tokens, k=k)
        if "saelens" in a.frontier_peers:
            saelens = [self.peer("frontier", "saelens", "relu", tokens=tokens, l1=l1) for l1 in a.frontier_l1]
            targets = [row["l0"] for row in saelens]
        else:
            targets = [16.0, 32.0, 64.0]
        self.ours("frontier", [SaeSpec("relu", a.d_sae, l1=TARGET_START, target_l0=t) for t in targets], tokens=tokens)
        self.ours("frontier", [SaeSpec("relu", a.d_sae, l1=l1) for l1 in a.ours_l1], tokens=tokens)


def setup_peers() -> None:
    """bench/.peers-venv: CPU torch first (else pip pulls a CUDA build), then the two peers."""
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    pip = [str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + list(PEER_PACKAGES), check=True)


def print_tables(rows: list[dict]) -> None:
    print()
    header = "| view | trainer | arch | setting | FVU | L0 | dead | CE recovered | KL | tokens | train s |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        shared = f" ({r['members_in_run']} in one run)" if r["members_in_run"] > 1 else ""
        print(f"| {r['view']} | {r['trainer']} | {r['arch']} | {r['setting']} | {r['fvu']:.4f} | {r['l0']:.1f} | "
              f"{r['dead']:.1%} | {r['ce_recovered']:.4f} | {r['kl']:.4f} | {r['tokens']:,} | {r['seconds']:.1f}{shared} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup-peers", action="store_true", help="create bench/.peers-venv and exit")
    parser.add_argument("--tokens", type=int, default=614_400, help="training tokens (equal-token view)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--saelens-l1", type=float, default=20.0, help="SAELens relu's L1 coefficient (equal tokens)")
    parser.add_argument("--frontier-k", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--frontier-l1", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    parser.add_argument("--ours-l1", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--heldout-windows", type=int, default=128)
    parser.add_argument("--peers", nargs="*", default=["saelens", "sparsify"], choices=("saelens", "sparsify"))
    parser.add_argument("--frontier-peers", nargs="*", default=["saelens", "sparsify"], choices=("saelens", "sparsify"),
                        help="peers trained for the frontier (each point a run of its own)")
    parser.add_argument("--views", nargs="+", default=["tokens", "time", "frontier"], choices=("tokens", "time", "frontier"))
    parser.add_argument("--workdir", default=str(HERE / ".quality"))
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="load a peer's finished run of the same settings from the workdir instead of training it "
                             "again (its wall time is then that run's)")
    args = parser.parse_args()
    if args.setup_peers:
        setup_peers()
        return
    if args.peers and not (PEERS_VENV / "bin" / "python").is_file():
        raise SystemExit(f"no {PEERS_VENV}: run `.venv/bin/python bench/quality.py --setup-peers` first, "
                         "or --peers with nothing to compare ours alone")
    torch.manual_seed(0)
    print(f"pythia-tiny {HOOK}, {args.d_sae} features, batch {args.batch_size}, {args.tokens} training tokens, "
          f"{args.heldout_windows} held-out windows of 128; torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench = Bench(args)
    if "tokens" in args.views or "time" in args.views:
        runs = bench.equal_tokens()
        if "time" in args.views:
            bench.equal_time(runs)
    if "frontier" in args.views:
        bench.frontier()
    print_tables(bench.rows)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.rows, indent=2))


if __name__ == "__main__":
    main()
