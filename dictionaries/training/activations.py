"""Residual activations for training: token windows → model → hook point → shuffled batches.

    source = ActivationSource(loaded, ActivationSpec(hook="blocks.2.hook_resid_post", tokens=1_000_000))
    for batch in source.batches(4096):           # (4096, d_in) float32, a fixed order for the seed
        ...

Windows come from the corpus in a seeded order (:func:`editing.corpora.iter_token_windows`),
go through the model with a hook at the hook point that stops the forward right after it,
and their activations pass through a token-level shuffling buffer so consecutive batches do
not come from the same documents. The corpus is cycled (a new window order each pass) when
it holds fewer tokens than asked for.

With ``cache=True`` the activations are also written as safetensors shards under
``$STEERSERVE_HOME/activations/<key>/``, keyed by the model's weights hash, hook point,
corpus, context length, token count and seed; a later run with the same key reads the
shards (memory-mapped by safetensors) instead of running the model, and yields exactly the
same batches. The cache directory appears atomically once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editing.corpora import iter_token_windows, open_corpus
from editing.home import activations_dir
from editing.nethook import Trace

SHARD_TOKENS = 65536


@dataclass(frozen=True)
class ActivationSpec:
    hook: str
    """Hook point, e.g. ``blocks.2.hook_resid_post``."""
    tokens: int
    """Activations to produce, in tokens."""
    corpus: str = "builtin:pydocs/train"
    context_length: int = 128
    seed: int = 0
    """Window order and shuffling."""
    windows_per_forward: int = 32
    shuffle_tokens: int = 65536
    """Size of the token shuffling buffer (0: no shuffling)."""

    def __post_init__(self):
        if self.tokens <= 0 or self.context_length < 2:
            raise ValueError("tokens must be positive and context_length at least 2")


class ActivationSource:
    def __init__(self, loaded, spec: ActivationSpec, *, cache: bool = False, root: Path | None = None):
        self.loaded = loaded
        self.spec = spec
        self.cache = cache
        self.root = Path(root) if root is not None else activations_dir()
        self.d_in = int(loaded.model.config.hidden_size)

    # --- identity -------------------------------------------------------------------------

    def key(self) -> str:
        identity = {"model_sha256": self.loaded.info.sha256, "hook": self.spec.hook, "corpus": self.spec.corpus,
                    "context_length": self.spec.context_length, "tokens": self.spec.tokens, "seed": self.spec.seed,
                    "dtype": self.loaded.info.dtype}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def cache_dir(self) -> Path:
        return self.root / self.key()

    def is_cached(self) -> bool:
        return (self.cache_dir() / "manifest.json").is_file()

    # --- producing ---------------------------------------------------------------------------

    @torch.no_grad()
    def _model_chunks(self) -> Iterator[torch.Tensor]:
        """Activations in window order, ``(n_tokens, d_in)`` float32 chunks, exactly ``tokens`` in all."""
        model, device = self.loaded.model, next(self.loaded.model.parameters()).device
        remaining, epoch = self.spec.tokens, 0
        while remaining > 0:
            windows = iter_token_windows(open_corpus(self.spec.corpus), self.loaded.tokenizer, self.spec.context_length,
                                         seed=self.spec.seed + epoch)
            produced_this_epoch = False
            while remaining > 0:
                batch = [w for _, w in zip(range(self.spec.windows_per_forward), windows)]
                if not batch:
                    break
                produced_this_epoch = True
                with Trace(model, self.spec.hook, stop=True) as trace:
                    model(input_ids=torch.stack(batch).to(device))
                acts = trace.output.float().reshape(-1, self.d_in)[:remaining].cpu()  # (W·T, d)
                remaining -= len(acts)
                yield acts
            if not produced_this_epoch:
                raise ValueError(f"corpus {self.spec.corpus!r} has no window of {self.spec.context_length} tokens")
            epoch += 1

    def _cached_chunks(self) -> Iterator[torch.Tensor]:
        manifest = json.loads((self.cache_dir() / "manifest.json").read_text())
        for name in manifest["shards"]:
            with safe_open(str(self.cache_dir() / name), framework="pt") as shard:
                yield shard.get_tensor("activations").float()

    def _writing_chunks(self) -> Iterator[torch.Tensor]:
        """Model chunks, also written into shards; the directory is renamed into place at the end."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.key()}.", dir=self.root))
        shards, pending, count = [], [], 0
        try:
            for chunk in self._model_chunks():
                pending.append(chunk)
                count += len(chunk)
                if count >= SHARD_TOKENS:
                    shards.append(self._write_shard(staging, len(shards), torch.cat(pending)))
                    pending, count = [], 0
                yield chunk
            if pending:
                shards.append(self._write_shard(staging, len(shards), torch.cat(pending)))
            manifest = {"spec": asdict(self.spec), "model": self.loaded.info.name, "model_sha256": self.loaded.info.sha256,
                        "d_in": self.d_in, "shards": shards}
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
            if self.cache_dir().exists():  # another run finished first: keep its copy
                shutil.rmtree(staging)
            else:
                os.rename(staging, self.cache_dir())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @staticmethod
    def _write_shard(directory: Path, index: int, acts: torch.Tensor) -> str:
        name = f"shard-{index:05d}.safetensors"
        save_file({"activations": acts.contiguous()}, str(directory / name))
        return name

    def chunks(self) -> Iterator[torch.Tensor]:
        if self.cache and self.is_cached():
            return self._cached_chunks()
        if self.cache:
            return self._writing_chunks()
        return self._model_chunks()

    # --- batches --------------------------------------------------------------------------------

    def batches(self, batch_size: int, *, skip: int = 0) -> Iterator[torch.Tensor]:
        """``(batch_size, d_in)`` batches in a fixed order for the spec; the last may be short.
        ``skip`` drops that many batches first (resuming a run)."""
        generator = torch.Generator().manual_seed(self.spec.seed)
        buffer = torch.empty(0, self.d_in)
        index = 0

        def emit(tokens: torch.Tensor) -> Iterator[torch.Tensor]:
            nonlocal index
            for start in range(0, len(tokens), batch_size):
                if index >= skip:
                    yield tokens[start : start + batch_size]
                index += 1

        carry = torch.empty(0, self.d_in)
        block = max(1, self.spec.shuffle_tokens // 4) if self.spec.shuffle_tokens > 0 else batch_size
        for chunk in _fixed_blocks(self.chunks(), block):  # the same blocks from the model or the cache
            if self.spec.shuffle_tokens <= 0:
                tokens = torch.cat([carry, chunk])
                cut = len(tokens) - len(tokens) % batch_size
                yield from emit(tokens[:cut])
                carry = tokens[cut:]
                continue
            buffer = torch.cat([buffer, chunk])
            if len(buffer) >= self.spec.shuffle_tokens:
                buffer = buffer[torch.randperm(len(buffer), generator=generator)]
                half = len(buffer) // 2
                out = torch.cat([carry, buffer[:half]])
                cut = len(out) - len(out) % batch_size
                yield from emit(out[:cut])
                carry, buffer = out[cut:], buffer[half:]
        rest = torch.cat([carry, buffer])
        if self.spec.shuffle_tokens > 0 and len(rest):
            rest = rest[torch.randperm(len(rest), generator=generator)]
        yield from emit(rest)


class TensorActivations:
    """Activations already at hand, ``(n_tokens, d_in)``, served as a run's batches: batch ``i``
    is rows ``[i·B, (i+1)·B)`` taken modulo ``n_tokens`` (the tensor is cycled, in its own order),
    so several trainers fed the same tensor see the same batches. ``tokens`` bounds the run."""

    def __init__(self, activations: torch.Tensor, tokens: int):
        if activations.ndim != 2 or not len(activations):
            raise ValueError("activations must be a non-empty (n_tokens, d_in) tensor")
        self.activations = activations
        self.tokens = tokens
        self.d_in = activations.shape[1]

    def batches(self, batch_size: int, *, skip: int = 0) -> Iterator[torch.Tensor]:
        n = len(self.activations)
        for start in range(skip * batch_size, self.tokens, batch_size):
            size = min(batch_size, self.tokens - start)
            rows = torch.arange(start, start + size) % n
            yield self.activations[rows].float()


def _fixed_blocks(chunks: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of ``(n, d)`` chunks into blocks of ``size`` rows (the last may be short)."""
    pending: list[torch.Tensor] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk)
        if count >= size:
            joined = torch.cat(pending)
            cut = len(joined) - len(joined) % size
            yield from joined[:cut].split(size)
            pending, count = [joined[cut:]], len(joined) - cut
    if count:
        yield torch.cat(pending)
