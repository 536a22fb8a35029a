"""The engine's plain request and result types (the HTTP layer converts its wire format into these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from editing.edits import EditError, EditSpec


class EngineError(EditError):
    """A request the caller got wrong; ``param`` names the field."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | tuple[int, ...]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    edits: tuple[EditSpec, ...] = ()
    include_baseline: bool = False
    return_features: tuple[str, int] | None = None  # (dictionary, top_k)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks, fixed-length outputs)
    prompt_logprobs: bool = False  # score every prompt token (the first has none); max_new_tokens may then be 0
    top_logprobs: int = 0  # the N most likely tokens (id, log p) at every scored position, prompt and generated


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    logprobs: list[float]  # log p(token) under the model's (edited) distribution, before temperature
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: list[int]
    edit_report: list[dict] = field(default_factory=list)
    features: list[dict] | None = None
    baseline: "GenerationResult | None" = None
    prompt_logprobs: list[float | None] | None = None  # log p(prompt[i] | prompt[:i]); None at i = 0
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # top-N (id, log p) a prompt position
    top_logprobs: list[list[tuple[int, float]]] | None = None  # top-N (id, log p) a generated token
    eos: tuple[int, float, list[tuple[int, float]]] | None = None
    """When the row stopped at end-of-sequence: that token, its log p and top-N (it is not in ``tokens``)."""
