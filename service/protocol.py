"""The HTTP wire format: request and response models, and the one error envelope.

Every request model validates its own fields (constrained ``Field``s, no NaN or infinity
anywhere) and converts itself into the engine's plain parameters with ``to_engine`` — the
engine never sees pydantic. Errors the caller made are 4xx with

    {"error": {"type": "invalid_request_error", "message": "...", "param": "edits[0].feature", "code": null}}

built by :func:`error_body` alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from editing.edits import EditSpec

MAX_PROMPT_CHARS = 20_000
MAX_COMPLETION_PROMPTS = 64  # prompts in one /v1/completions request (each is its own choice)
MAX_WIRE_LOGPROBS = 20  # the wire's bound on `logprobs`; the server's configured cap (Limits.max_logprobs) is lower
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

    def as_data(self) -> dict:
        """The error as plain data, to cross a Ray handle (see :meth:`from_data`)."""
        return {"error": self.body(), "status": self.status, "headers": self.headers}

    @classmethod
    def from_data(cls, data: dict) -> "ApiError":
        error = data["error"]["error"]
        return cls(data["status"], error["message"], type=error["type"], param=error["param"],
                   headers=data.get("headers"))


def error_body(type: str, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"type": type, "message": message, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    type: str = Field(description="invalid_request_error, not_found_error, conflict_error, authentication_error, "
                                  "permission_error, rate_limit_error, request_too_large, overloaded_error, server_error")
    message: str
    param: str | None = Field(description="The field the error is about (edits[0].feature), if any.")
    code: str | None


class ErrorEnvelope(BaseModel):
    """The one error envelope every 4xx/5xx answer carries."""

    error: ErrorDetail


def dictionary_name(name: str, param: str = "name") -> str:
    """``name`` if a dictionary may have it (``dictionaries.store.validate_name``); else a 400 naming ``param``."""
    from dictionaries.config import DictionaryError
    from dictionaries.store import validate_name

    try:
        return validate_name(name)
    except DictionaryError as err:
        raise ApiError(400, str(err), param=param) from None


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
    stream: bool = Field(default=False, description="Server-sent events: text deltas and token ids (and the "
                                                    "baseline's) as they are generated, then the full response, "
                                                    "then [DONE].")
    ignore_eos: bool = Field(default=False, description="Keep generating past EOS (fixed-length outputs, "
                                                        "benchmarks).")

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
            include_baseline=self.include_baseline, ignore_eos=self.ignore_eos,
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
    """``POST /v1/completions``: OpenAI-compatible, with ``edits`` as an extension. The model
    may be ``BASE+PRESET`` (a stored steering preset; see ``/v1/presets``)."""

    model: str | None = Field(default=None, description="A served model, or BASE+PRESET; default: the first model.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists; each prompt "
                    f"is answered as its own choice (at most {MAX_COMPLETION_PROMPTS}).")
    max_tokens: int = Field(default=16, ge=0, description="0 (with echo) scores the prompt without generating.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = Field(default=False, description="Server-sent events; one string prompt, without echo.")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_WIRE_LOGPROBS,
                                 description="Log-probability of each token and of the N most likely alternatives "
                                             "(N at most the server's max_logprobs, 5 by default).")
    echo: bool = Field(default=False, description="Return the prompt before the completion (with its tokens' "
                                                  "log-probabilities when logprobs is set; the first token's is null).")
    user: str | None = None
    edits: list[EditSpec] = Field(default_factory=list, description="steerserve extension: feature edits, applied "
                                                                    "after a preset's.")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
        if not prompts:
            raise ValueError("the prompt list is empty")
        if len(prompts) > MAX_COMPLETION_PROMPTS:
            raise ValueError(f"at most {MAX_COMPLETION_PROMPTS} prompts a request")
        for prompt in prompts:
            if isinstance(prompt, str) and not 0 < len(prompt) <= MAX_PROMPT_CHARS:
                raise ValueError(f"each prompt must be 1 to {MAX_PROMPT_CHARS} characters")
            if not isinstance(prompt, str) and (not prompt or any(t < 0 for t in prompt)):
                raise ValueError("a token-id prompt must hold at least one id, each >= 0")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens 0 generates nothing: it only scores the prompt, so set echo: true",
                           param="max_tokens")
        if self.stream and (self.echo or len(self.prompts()) != 1 or not isinstance(self.prompts()[0], str)):
            raise ApiError(400, "stream supports one string prompt without echo", param="stream")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Every prompt, in order: strings or token-id lists."""
        value = self.prompt
        return [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 8 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("at most 8 stop strings of 1 to 64 characters")
        return stops

    def to_generate(self) -> GenerateRequest:
        """The native request of a streamed completion (one string prompt)."""
        return GenerateRequest(model=self.model, prompt=self.prompts()[0], max_new_tokens=self.max_tokens,
                               temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop or [],
                               edits=self.edits)


class PresetRequest(_Model):
    """``PUT /v1/presets/{name}`` (admin): a named list of edits, selected as ``"model": "BASE+NAME"``."""

    model: str | None = Field(default=None, description="The served model the preset is for; default: the first.")
    edits: list[EditSpec] = Field(min_length=1, description="Applied in order, before a request's own edits.")
    description: str = Field(default="", max_length=500)


class InspectRequest(_Model):
    """``POST /v1/inspect``: the top features at each token of a text."""

    model: str | None = None
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    dictionary: str = Field(min_length=1, max_length=64)
    top_k: int = Field(default=5, ge=1, le=64)


class Span(_Model):
    start: int = Field(ge=0, description="First character (or token) of the span.")
    end: int = Field(ge=1, description="One past its last character (or token).")
    unit: Literal["char", "token"] = "char"


class SearchRequest(_Model):
    """``POST /v1/search``: the features most active on a span of a text (search by example)."""

    model: str | None = None
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    dictionary: str = Field(min_length=1, max_length=64)
    span: Span
    top_k: int = Field(default=10, ge=1, le=100)
    rank_by: Literal["relative", "activation"] = Field(
        default="relative", description="relative: activation on the span over the feature's recorded maximum; "
                                        "activation: the activation itself.")


CONTRAST_CORPORA = ("builtin:pydocs", "builtin:pydocs/train", "builtin:pydocs/heldout")
MAX_CONTRAST_TEXTS = 256
MAX_CONTRAST_TOKENS = 16_384


class ContrastSet(_Model):
    """One side of a contrast: texts, or a corpus the server exposes (never a path)."""

    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CONTRAST_TEXTS)
    corpus: Literal[CONTRAST_CORPORA] | None = None
    tokens: int = Field(default=4096, ge=128, le=MAX_CONTRAST_TOKENS, description="Tokens read from the corpus.")

    @model_validator(mode="after")
    def _texts_or_corpus(self) -> "ContrastSet":
        if (self.texts is None) == (self.corpus is None):
            raise ValueError("give exactly one of 'texts' and 'corpus'")
        return self


class ContrastRequest(_Model):
    """``POST /v1/contrast``: which features separate two sets of texts, and the difference-of-means
    residual vector at the dictionary's hook."""

    model: str | None = None
    dictionary: str = Field(min_length=1, max_length=64)
    a: ContrastSet
    b: ContrastSet
    unit: Literal["text", "token"] = Field(default="text", description="One observation: a text's mean activation "
                                                                      "(text), or every token (token).")
    top_k: int = Field(default=20, ge=1, le=200)
    direction: Literal["both", "a", "b"] = Field(default="both", description="Rank by |g|, or higher in A, or in B.")
    include_vector: bool = True
    save_vector: str | None = Field(default=None, min_length=1, max_length=64,
                                    description="Store the difference-of-means vector under this name (admin).")


class VectorUpload(_Model):
    """``PUT /v1/vectors/{name}`` (admin): a steering vector at a hook point."""

    hook: str = Field(pattern=r"^blocks\.\d+\.hook_resid_(pre|post)$")
    values: list[float] = Field(min_length=1, max_length=65_536)
    model: str | None = Field(default=None, description="The served model it is for (checks its width).")
    description: str | None = Field(default=None, max_length=500)


class EvaluationJobRequest(_Model):
    """``POST /v1/evaluations``: evaluate a stored dictionary (and edits) in the background."""

    dictionary: str = Field(min_length=1, max_length=64)
    edits: list[EditSpec] = Field(default_factory=list, max_length=32)
    corpus: str = Field(default="builtin:pydocs/heldout", min_length=1, max_length=512,
                        description="A corpus the server exposes, by name (optionally NAME/train or NAME/heldout "
                                    "for a builtin one); never a path.")
    tokens: int = Field(default=32768, ge=128, le=4_000_000)
    model: str | None = Field(default=None, description="A model the server serves (default: the dictionary's own "
                                                        "when served, else the first one), or BASE+PRESET: the "
                                                        "preset's edits come before these edits.")
    target_tokens: list[str] = Field(default_factory=list, max_length=32,
                                     description="The edit effect's target tokens (each one token); default: the "
                                                 "edited features' top logit-lens tokens.")


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
    corpus: str = Field(default="builtin:pydocs/train", min_length=1, max_length=256, description=(
        "builtin:pydocs[/train|/heldout], an hf: data set, or a corpus the server exposes by name (as evaluation "
        "jobs name them, optionally NAME#train or NAME#heldout); never a path"))
    heldout_corpus: str | None = Field(default=None, min_length=1, max_length=256, description=(
        "corpus for the held-out metrics, named like 'corpus'; default: the training corpus's held-out split"))
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

# --- the browser page's additions: who am I, feature search ------------------------------------------

class WhoAmI(BaseModel):
    """``GET /v1/whoami``: the caller's role, so a client can offer only what it may do."""

    role: Literal["user", "admin"] = Field(description="On an open server (no keys configured): admin.")
    name: str | None = Field(description="The key's name; null on an open server.")
    open: bool = Field(description="True when the server has no API keys and everyone may do everything.")


class ContextToken(BaseModel):
    token: str
    token_id: int
    activation: float


class LensToken(BaseModel):
    token: str
    token_id: int
    value: float


class FeatureSnippet(BaseModel):
    """The top context where the feature fires most on a query word."""

    context: int = Field(description="Which of the feature's top contexts (0 = the highest).")
    text: str
    match: list[int] = Field(description="[start, end) of the matching word in text, in characters.")
    activation: float = Field(description="The feature's activation on the matching word (max over its tokens).")
    max_activation: float = Field(description="The feature's maximum activation in this context.")
    tokens: list[ContextToken]


class FeatureHit(BaseModel):
    feature: int
    score: float = Field(description="Summed over query words: 2·(1 − 0.05·rank) for a promoted logit-lens "
                                     "token, + activation on the word / max activation, + 0.1 a context; "
                                     "prefix matches count half.")
    density: float = Field(description="Firing density (fraction of tokens where the feature is active).")
    mean_activation: float
    max_activation: float
    matched_terms: list[str]
    promoted_matches: list[str] = Field(description="Promoted logit-lens tokens that match a query word.")
    context_matches: int = Field(description="How many of the feature's top contexts hold a query word.")
    snippet: FeatureSnippet | None
    promoted: list[LensToken]


class FeatureSearchResponse(BaseModel):
    """``GET /v1/dictionaries/{name}/features?q=``: features ranked by matches of the query."""

    object: Literal["list"] = "list"
    dictionary: str
    model: str
    query: str
    terms: list[str] = Field(description="The query's words (case-folded), as searched.")
    matched: int = Field(description="How many features match at least one word (data holds at most limit).")
    data: list[FeatureHit]
