"""Build ``pythia-tiny``: the embedded default model, made offline from CPython's own text.

A byte-level BPE tokenizer is trained with ``tokenizers`` on ``builtin:pydocs/train``,
then a small GPT-NeoX (the Pythia architecture: rotary on a quarter of each head,
parallel residual, untied unembedding) is trained on the same split with a fixed seed for
a fixed number of steps, and evaluated on ``builtin:pydocs/heldout``. The result is saved
with ``save_pretrained`` beside a ``card.json`` (config, tokens seen, seed, held-out CE and
perplexity, sha256 of the weights). The directory appears atomically: a build that is
interrupted leaves nothing half-written under the final name.

    steerserve models build pythia-tiny        # about 3 minutes on 2 CPU cores

Tests build a smaller :class:`TinySpec` with the same code.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editing.corpora import open_corpus, token_windows

EOS_TOKEN = "<|endoftext|>"  # id 0, as in Pythia
PAD_TOKEN = "<|padding|>"  # id 1, as in Pythia


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny build; the same spec gives the same weights."""

    vocab_size: int = 4096
    """BPE vocabulary including the two special tokens."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    context_length: int = 128
    """Tokens a training window."""
    batch_size: int = 16
    steps: int = 900
    """Optimiser steps; calibrated to about 3 minutes on 2 CPU cores."""
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    seed: int = 0
    corpus: str = "builtin:pydocs"
    max_train_documents: int | None = None
    """Use only the first N training documents (tests build small variants)."""
    max_eval_windows: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must leave room for the 256 byte tokens and merges")


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def tiny_config(spec: TinySpec, vocab_size: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=4 * spec.hidden_size,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over windows of equal length (nats a token)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]  # (B, T)
        logits = model(input_ids=batch).logits[:, :-1]  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


def _lr_at(step: int, spec: TinySpec) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_tiny_model(out_dir: Path, spec: TinySpec = TinySpec(), *, progress: bool = True) -> dict:
    """Train and save a tiny GPT-NeoX into ``out_dir``; return its card."""
    from transformers import GPTNeoXForCausalLM

    started = time.time()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    train_docs = list(open_corpus(f"{spec.corpus}#train").documents())
    if spec.max_train_documents is not None:
        train_docs = train_docs[: spec.max_train_documents]
    texts = [doc.text for doc in train_docs]

    say = tqdm.write if progress else (lambda *_: None)
    say(f"pythia-tiny: training a {spec.vocab_size}-token BPE tokenizer on {len(texts)} documents")
    tokenizer = train_tokenizer(texts, spec.vocab_size)

    train_corpus = _ListCorpus(f"{spec.corpus}#train", train_docs)
    train_windows = token_windows(train_corpus, tokenizer, spec.context_length)  # (N, T)
    eval_windows = token_windows(
        open_corpus(f"{spec.corpus}#heldout"), tokenizer, spec.context_length, max_windows=spec.max_eval_windows
    )

    torch.manual_seed(spec.seed)
    model = GPTNeoXForCausalLM(tiny_config(spec, len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(train_windows), generator=generator)
    cursor = 0
    model.train()
    bar = tqdm(range(spec.steps), desc="pythia-tiny: training", unit="step", disable=not progress)
    for step in bar:
        if cursor + spec.batch_size > len(order):
            order, cursor = torch.randperm(len(train_windows), generator=generator), 0
        batch = train_windows[order[cursor : cursor + spec.batch_size]]  # (B, T)
        cursor += spec.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 or step == spec.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    ce = heldout_loss(model, eval_windows)
    say(f"pythia-tiny: held-out cross-entropy {ce:.4f} nats/token, perplexity {math.exp(ce):.2f}")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        from editing.model import weights_sha256

        card = {
            "name": out_dir.name,
            "architecture": "gpt_neox",
            "spec": asdict(spec),
            "config": {
                "vocab_size": len(tokenizer),
                "hidden_size": spec.hidden_size,
                "num_layers": spec.num_layers,
                "num_heads": spec.num_heads,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            "training_tokens": spec.steps * spec.batch_size * spec.context_length,
            "training_documents": len(train_docs),
            "seed": spec.seed,
            "heldout": {
                "corpus": f"{spec.corpus}#heldout",
                "tokens": int(eval_windows[:, 1:].numel()),
                "cross_entropy": ce,
                "perplexity": math.exp(ce),
            },
            "torch": torch.__version__,
            "build_seconds": round(time.time() - started, 1),
            "weights_sha256": weights_sha256(tmp),
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first, then removed."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


@dataclass(frozen=True)
class _ListCorpus:
    """A corpus over documents already in memory (the builder's subset)."""

    name: str
    docs: list

    def documents(self):
        return iter(self.docs)
