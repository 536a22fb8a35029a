"""The HTTP wire format: request and response models, and the one error envelope.

Every request model validates its own fields (constrained ``Field``s, no NaN or infinity
anywhere) and converts itself into the engine's plain parameters with ``to_engine`` — the
engine never sees pydantic. Errors the caller made are 4xx with

    {"error": {"type": "invalid_request_error", "message": "...", "param": "edits[0].feature", "code": null}}

built by :func:`error_body` alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from editing.edits import EditSpec

MAX_PROMPT_CHARS = 20_000
SERVER_CORPUS = r"^(builtin:pydocs(/train|/heldout)?|hf:[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?(@[A-Za-z0-9_.-]+)?)(#(train|heldout))?$"
"""Corpora a training job may name: the built-in one, or a ``datasets`` dataset by hub name
already on the server; never a server file-system path."""


class ApiError(Exception):
    """An error with its HTTP status and envelope fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers or {}

    def body(self) -> dict:
        return error_body(self.type, self.message, self.param)


def error_body(type: str, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"type": type, "message": message, "param": param, "code": code}}


def validation_param(location: tuple) -> str | None:
    """pydantic's error location → ``edits[0].feature``."""
    parts = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item not in ("body",) and not str(item).startswith(("function-", "constrained-", "literal[")):
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ReturnFeatures(_Model):
    dictionary: str = Field(min_length=1, max_length=64)
    top_k: int = Field(default=5, ge=1, le=64)


class GenerateRequest(_Model):
    """``POST /v1/generate``: steered generation, the native way."""

    model: str | None = Field(default=None, description="Served model; default: the first one.")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(default=32, ge=1, description="At most the server's cap.")
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000, description="0 = off.")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=8)
    edits: list[EditSpec] = Field(default_factory=list)
    include_baseline: bool = False
    return_features: ReturnFeatures | None = None

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s or len(s) > 64 for s in value):
            raise ValueError("stop strings must be 1 to 64 characters")
        return value

    def to_engine(self):
        from editing.engine import GenerationRequest

        return GenerationRequest(
            prompt=self.prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=tuple(self.stop), edits=tuple(self.edits),
            include_baseline=self.include_baseline,
            return_features=(self.return_features.dictionary, self.return_features.top_k) if self.return_features else None,
        )


class Baseline(BaseModel):
    text: str
    tokens: list[int]


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str = Field(description="The generated continuation only.")
    tokens: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    edit_report: list[dict]
    features: list[dict] | None = None
    baseline: Baseline | None = None


class CompletionRequest(_Model):
    """``POST /v1/completions``: OpenAI-compatible, with ``edits`` as an extension."""

    model: str | None = None
    prompt: str | list[str] = Field(description="A string, or a list holding exactly one string.")
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    logprobs: int | None = Field(default=None, ge=0, le=0, description="0: log-probability of each chosen token.")
    echo: Literal[False] = False
    user: str | None = None
    edits: list[EditSpec] = Field(default_factory=list, description="steerserve extension: feature edits.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("a list prompt must hold exactly one string")
            value = value[0]
        if not value or len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt must be 1 to {MAX_PROMPT_CHARS} characters")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 8 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("at most 8 stop strings of 1 to 64 characters")
        return stops

    def to_generate(self) -> GenerateRequest:
        return GenerateRequest(model=self.model, prompt=self.prompt, max_new_tokens=self.max_tokens,
                               temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop or [],
                               edits=self.edits)


class InspectRequest(_Model):
    """``POST /v1/inspect``: the top features at each token of a text."""

    model: str | None = None
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    dictionary: str = Field(min_length=1, max_length=64)
    top_k: int = Field(default=5, ge=1, le=64)


class EvaluationJobRequest(_Model):
    """``POST /v1/evaluations``: evaluate a stored dictionary (and edits) in the background."""

    dictionary: str = Field(min_length=1, max_length=64)
    edits: list[EditSpec] = Field(default_factory=list, max_length=32)
    corpus: str = Field(default="builtin:pydocs/heldout", min_length=1, max_length=512)
    tokens: int = Field(default=32768, ge=128, le=4_000_000)
    model: str | None = None


class TrainingJobRequest(_Model):
    """``POST /v1/trainings`` (admin): train a sweep and publish it; ``deploy`` serves the result."""

    name: str = Field(min_length=1, max_length=64)
    model: str = "pythia-tiny"
    hook: str = Field(pattern=r"^blocks\.\d+\.hook_resid_(pre|post)$")
    architecture: Literal["relu", "topk", "jumprelu"] = "topk"
    d_sae: list[int] = Field(default_factory=lambda: [1024], min_length=1, max_length=8)
    l1: list[float] | None = Field(default=None, min_length=1, max_length=8, description=(
        "sparsity coefficients (default [1.0]); with target_l0 the coefficient to start from (default 0.01)"))
    k: list[int] = Field(default_factory=lambda: [32], min_length=1, max_length=8)
    target_l0: list[float] | None = Field(default=None, min_length=1, max_length=8, description=(
        "relu/jumprelu: train to these L0s (one member each); the sparsity coefficient is steered "
        "during training, starting from l1[0] (default 0.01)"))
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=8)
    tokens: int = Field(default=1_000_000, ge=1024, le=200_000_000)
    corpus: str = Field(default="builtin:pydocs/train", max_length=256, pattern=SERVER_CORPUS)
    heldout_corpus: str | None = Field(default=None, max_length=256, pattern=SERVER_CORPUS, description=(
        "corpus for the held-out metrics; default: the training corpus's held-out split"))
    batch_size: int = Field(default=2048, ge=64, le=65536)
    learning_rate: float | None = Field(default=None, gt=0, le=1, description="default: scaled with d_sae")
    context_length: int = Field(default=128, ge=8, le=2048)
    seed: int = Field(default=0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Matmul precision; auto is bfloat16 on CUDA, float32 on CPU."""
    deploy: bool = False

    @field_validator("d_sae")
    @classmethod
    def _sizes(cls, value):
        if any(not 16 <= size <= 262144 for size in value):
            raise ValueError("each d_sae must be in [16, 262144]")
        return value

    @field_validator("target_l0")
    @classmethod
    def _targets(cls, value, info: ValidationInfo):
        if value is None:
            return value
        if info.data.get("architecture") == "topk":
            raise ValueError("target_l0 is for relu and jumprelu; a topk dictionary's L0 is its k")
        if any(not target > 0 for target in value):
            raise ValueError("each target_l0 must be positive")
        return value
