"""Continuous (iteration-level) batching: the scheduler owns the running batch and loops.

    scheduler = Scheduler(engine, SchedulerLimits(max_running_rows=32))
    handle = scheduler.submit(GenerationRequest("def main(", max_new_tokens=16))   # any thread
    while scheduler.step(): ...                                                   # one thread
    handle.result                                                                  # a GenerationResult

Each :meth:`Scheduler.step` (Orca's "schedule per iteration, not per request"):

1. drops the rows of cancelled requests;
2. admits waiting requests, oldest first, while the row limit and the tokens-in-flight
   budget (prompt + ``max_new_tokens`` of every admitted row) allow; a request and its
   baseline row are admitted together;
3. runs one decode forward for every decoding row (one token each);
4. runs one prefill forward over the oldest rows still reading their prompt: at most
   ``prefill_chunk_tokens`` padded positions, so a long prompt is read in chunks and never
   stalls everyone's decoding for its whole length; a row whose prompt is complete samples
   its first token and decodes from the next step on;
5. retires rows that finished (EOS, a stop string, their length, cancelled) at once,
   freeing their slot and key/value memory, and hands each request what the step produced.

A request may ask for the log-probability of every prompt token (``prompt_logprobs``) and
the top-N alternatives at each scored position (``top_logprobs``); the prefill forwards that
read its prompt compute them. With ``max_new_tokens=0`` such a request generates nothing: it
retires in the step that finishes reading (scoring) its prompt.

A request's result does not depend on the batch: its rows are exactly the rows it gets
alone (edits are per row; a seeded draw depends only on the seed and the row's own
step), whoever joins or leaves around it. Past ``max_queued_requests`` waiting requests
:meth:`submit` raises :class:`QueueFullError` instead of queueing without bound.

``submit`` and ``cancel`` may be called from any thread; ``step`` from one thread only.
Callbacks run in the stepping thread.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from editing.edits import EditSpec
from editing.engine.batch import RunningBatch, hook_order
from editing.engine.requests import EngineError, GenerationRequest, GenerationResult


@dataclass(frozen=True)
class SchedulerLimits:
    max_running_rows: int = 32
    """Rows decoding or reading their prompt at once (a baseline is a row)."""
    max_queued_requests: int = 256
    """Requests waiting for admission; past this, submit refuses (HTTP 503)."""
    max_tokens_in_flight: int = 65_536
    """Σ over admitted rows of prompt + max_new_tokens: the key/value memory bound."""
    prefill_chunk_tokens: int = 256
    """Padded prompt positions one prefill forward may read (chunked prefill)."""

    def __post_init__(self):
        for name in ("max_running_rows", "max_queued_requests", "max_tokens_in_flight", "prefill_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class QueueFullError(Exception):
    """The waiting queue is at its limit; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SequenceUpdate:
    """What one step produced for one row of a request (streaming)."""

    baseline: bool
    tokens: list[int]  # the new tokens
    logprobs: list[float]
    finish_reason: str | None  # "stop" | "length" | "cancelled" when the row finished
    text: str | None = None  # the final text when a stop string cut it


class SchedulerObserver:
    """Hooks for metrics; the default does nothing. Called in the stepping thread."""

    def step(self, decoding: int, prefilling: int, waiting: int, tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def token_gap(self, seconds: float) -> None: ...
    def finished(self, handle: "RequestHandle") -> None: ...
    def rejected(self) -> None: ...


class RequestHandle:
    """One submitted request: its result or error once done, and streaming callbacks."""

    def __init__(self, request_id: int, request: GenerationRequest, on_update, on_done):
        self.id, self.request = request_id, request
        self.on_update: Callable[[list[SequenceUpdate]], None] | None = on_update
        self.on_done: Callable[["RequestHandle"], None] | None = on_done
        self.result: GenerationResult | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self.sequences: list[Sequence] = []

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None or (self.cancelled and not self.sequences)


@dataclass(eq=False)
class Sequence:
    """One row: a request's main row, or its baseline (the same request with no edits)."""

    handle: RequestHandle
    baseline: bool
    prompt: list[int]
    edits: tuple[EditSpec, ...]
    readout: tuple[str, int] | None
    dictionaries: dict  # name -> Dictionary, resolved at admission
    max_new_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool
    score_prompt: bool
    top_n: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_scores: list = field(default_factory=list)  # log p of each prompt token (None first), if scored
    prompt_top: list = field(default_factory=list)  # top-N a scored prompt position (None first)
    top: list = field(default_factory=list)  # top-N a generated token
    eos: tuple | None = None  # (token, log p, top-N) of the end-of-sequence token that stopped the row
    prefilled: int = 0
    finish_reason: str | None = None
    text: str | None = None
    slot: int = -1
    last_token_at: float = 0.0
    result: GenerationResult | None = None
    fresh: int = 0  # tokens appended this step
    vectors: dict = field(default_factory=dict)  # name -> SteeringVector, resolved at admission
    feature_max: dict = field(default_factory=dict)  # dictionary name -> recorded max activations (value units)

    @property
    def tokens_needed(self) -> int:
        return len(self.prompt) + self.max_new_tokens


class Scheduler:
    def __init__(self, engine, limits: SchedulerLimits = SchedulerLimits(), observer: SchedulerObserver | None = None):
        self.engine, self.limits = engine, limits
        self.observer = observer or SchedulerObserver()
        tokenizer = engine.tokenizer
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch = RunningBatch(engine.model, limits.max_running_rows, pad)
        self._lock = threading.Lock()
        self._waiting: deque[RequestHandle] = deque()
        self._cancel: list[RequestHandle] = []
        self._ids = itertools.count()
        self.tokens_in_flight = 0

    # --- any thread ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, *, on_update=None, on_done=None, index: int = 0) -> RequestHandle:
        """Validate and queue ``request``; raises :class:`EngineError` (the caller's mistake)
        or :class:`QueueFullError`. ``on_update(updates)`` is called after every step that
        produced tokens for it, ``on_done(handle)`` once when it is finished, failed or cancelled."""
        ids = self.engine.validate(request, index)
        rows = 2 if request.include_baseline else 1
        where = f"requests[{index}]"
        if rows > self.limits.max_running_rows:
            raise EngineError(f"{where}.include_baseline needs 2 rows; this server runs at most "
                              f"{self.limits.max_running_rows} at once", f"{where}.include_baseline")
        if rows * (len(ids) + request.max_new_tokens) > self.limits.max_tokens_in_flight:
            raise EngineError(f"{where}: {rows} row(s) of {len(ids)} prompt + {request.max_new_tokens} new tokens are "
                              f"more than this server holds at once ({self.limits.max_tokens_in_flight} tokens)",
                              f"{where}.max_new_tokens")
        request = replace(request, prompt=tuple(ids))
        handle = RequestHandle(next(self._ids), request, on_update, on_done)
        with self._lock:
            # requests that arrived since the last step and fit the free rows are not queued yet
            free_rows = max(0, self.limits.max_running_rows - self.batch.n_rows)
            queued = len(self._waiting) - free_rows
            if queued >= self.limits.max_queued_requests:
                self.observer.rejected()
                raise QueueFullError(f"{queued} requests are already waiting (the limit is "
                                     f"{self.limits.max_queued_requests}); retry shortly")
            self._waiting.append(handle)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stop ``handle``: its rows leave the batch at the next step."""
        with self._lock:
            if not handle.done and not handle.cancelled:
                handle.cancelled = True
                self._cancel.append(handle)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._cancel or self.batch.n_rows)

    # --- the stepping thread ----------------------------------------------------------------------

    def run_until_idle(self) -> None:
        while self.step():
            pass

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        batch = self.batch
        if not batch.n_rows:
            self.observer.step(0, 0, len(self._waiting), 0)
            return False
        decoding = batch.sequences[: batch.n_decode]
        prompt_rows = batch.sequences[batch.n_decode :]
        if decoding:
            tokens, logprobs, tops = batch.decode()
            now = time.monotonic()
            for sequence, token, logprob, top in zip(decoding, tokens, logprobs, tops or [None] * len(tokens)):
                self.observer.token_gap(now - sequence.last_token_at)
                self._record(sequence, token, logprob, top, now)
        promoted = []
        if prompt_rows:
            count, chunk = self._plan_prefill(prompt_rows)
            now_complete = batch.prefill(count, chunk)
            now = time.monotonic()
            for sequence, token, logprob, top in now_complete:
                self._record(sequence, token, logprob, top, now)
                promoted.append(sequence)
        produced = sum(s.fresh for s in decoding + promoted)
        finished = [s for s in batch.sequences if s.finish_reason is not None]
        for sequence in finished:
            sequence.result = self._result(sequence)
        batch.reorder([s for s in decoding if s.finish_reason is None],
                      [s for s in promoted if s.finish_reason is None],
                      [s for s in prompt_rows if s.prefilled < len(s.prompt)])
        self._deliver(decoding + promoted, finished)
        self.observer.step(batch.n_decode, batch.n_prefill, len(self._waiting), produced)
        return True

    def _plan_prefill(self, rows: list[Sequence]) -> tuple[int, int]:
        """How many of the oldest prompt rows read how many tokens in this step's prefill: the
        first always reads (up to the budget); others join while rows × longest chunk fits."""
        budget = self.limits.prefill_chunk_tokens
        count, chunk = 0, 0
        for sequence in rows:
            wanted = min(len(sequence.prompt) - sequence.prefilled, budget)
            widest = max(chunk, wanted)
            if count and (count + 1) * widest > budget:
                break
            count, chunk = count + 1, widest
        return count, chunk

    def _admit(self) -> None:
        batch, limits = self.batch, self.limits
        while True:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting[0]
                request = handle.request
                rows = 2 if request.include_baseline else 1
                need = rows * (len(request.prompt) + request.max_new_tokens)
                if batch.n_rows + rows > limits.max_running_rows or self.tokens_in_flight + need > limits.max_tokens_in_flight:
                    return
                self._waiting.popleft()
            try:
                self.engine.validate(request)  # a dictionary may have been undeployed while it waited
                dictionaries, vectors, feature_max = self.engine.resources(request)
            except Exception as err:  # noqa: BLE001 - this request fails (EditError: a 4xx), the rest go on
                self._fail(handle, err)
                continue
            self.tokens_in_flight += need
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            common = dict(prompt=list(request.prompt), max_new_tokens=request.max_new_tokens, stop=tuple(request.stop),
                          ignore_eos=request.ignore_eos, score_prompt=request.prompt_logprobs,
                          top_n=request.top_logprobs, temperature=request.temperature, top_k=request.top_k,
                          top_p=request.top_p, seed=seed)
            main = Sequence(handle, False, edits=tuple(request.edits), readout=request.return_features,
                            dictionaries=dictionaries, vectors=vectors, feature_max=feature_max, **common)
            handle.sequences.append(main)
            if request.include_baseline:
                handle.sequences.append(Sequence(handle, True, edits=(), readout=None, dictionaries={}, **common))
            for sequence in handle.sequences:
                batch.add(sequence)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancel = self._cancel, []
            for handle in cancelled:
                if handle in self._waiting:
                    self._waiting.remove(handle)
        if not cancelled:
            return
        gone = set()
        for handle in cancelled:
            for sequence in handle.sequences:
                if sequence.finish_reason is None:
                    sequence.finish_reason = "cancelled"
                    gone.add(sequence)
        batch = self.batch
        if gone:
            for sequence in gone:
                self.tokens_in_flight -= sequence.tokens_needed
            batch.reorder([s for s in batch.sequences[: batch.n_decode] if s not in gone], [],
                          [s for s in batch.sequences[batch.n_decode :] if s not in gone])
        for handle in cancelled:
            handle.sequences = []
            self._notify_done(handle)

    # --- tokens and results --------------------------------------------------------------------------

    def _record(self, sequence: Sequence, token: int, logprob: float, top: list | None, now: float) -> None:
        handle = sequence.handle
        if handle.first_token is None and not sequence.baseline:
            handle.first_token = now
            self.observer.first_token(now - handle.submitted)
        sequence.last_token_at = now
        top = top[: sequence.top_n] if top is not None and sequence.top_n else None
        if sequence.max_new_tokens == 0:  # the prompt was only to be scored
            sequence.finish_reason = "length"
            return
        if token == self.eos and not sequence.ignore_eos:
            sequence.finish_reason = "stop"
            sequence.eos = (token, logprob, top or [])
            return
        sequence.tokens.append(token)
        sequence.logprobs.append(logprob)
        if top is not None:
            sequence.top.append(top)
        sequence.fresh += 1
        if sequence.stop:
            text = self.engine.tokenizer.decode(sequence.tokens)
            hits = [text.find(stop) for stop in sequence.stop if stop and stop in text]
            if hits:
                sequence.text, sequence.finish_reason = text[: min(hits)], "stop"
                return
        if len(sequence.tokens) >= sequence.max_new_tokens:
            sequence.finish_reason = "length"

    def _result(self, sequence: Sequence) -> GenerationResult:
        """What a finished row produced; read from the batch while it still holds its slot."""
        report, features = [], None
        for name, dictionary in sequence.dictionaries.items():
            table = self.batch.table_of(dictionary)
            mine = [edit for edit in sequence.edits if edit.dictionary == name]
            if mine:
                report.append((table, table.report(sequence.slot, mine)))
            if sequence.readout and sequence.readout[0] == name:
                features = self._features(sequence, *table.read_features(sequence.slot))
        report += self.batch.vector_reports(sequence)
        report.sort(key=lambda pair: hook_order(pair[0]))
        return GenerationResult(
            text=sequence.text if sequence.text is not None else self.engine.tokenizer.decode(sequence.tokens),
            tokens=sequence.tokens, logprobs=sequence.logprobs,
            finish_reason=sequence.finish_reason,
            prompt_tokens=sequence.prompt, edit_report=[entry for _, entry in report], features=features,
            prompt_logprobs=sequence.prompt_scores if sequence.score_prompt else None,
            prompt_top_logprobs=sequence.prompt_top if sequence.score_prompt and sequence.top_n else None,
            top_logprobs=sequence.top if sequence.top_n else None, eos=sequence.eos)

    def _features(self, sequence: Sequence, values, indices) -> list[dict]:
        decode = self.engine.tokenizer.decode
        ids = sequence.prompt + sequence.tokens
        features = []
        for position in range(len(values)):
            keep = values[position] > 0
            features.append({
                "position": position, "token_id": ids[position], "token": decode([ids[position]]),
                "kind": "prompt" if position < len(sequence.prompt) else "generated",
                "features": [{"feature": int(f), "activation": float(a)}
                             for f, a in zip(indices[position][keep], values[position][keep])],
            })
        return features

    def _deliver(self, stepped: list[Sequence], finished: list[Sequence]) -> None:
        updates: dict[int, list[SequenceUpdate]] = {}
        for sequence in stepped:
            handle = sequence.handle
            if handle.on_update is not None and (sequence.fresh or sequence.finish_reason):
                updates.setdefault(handle.id, []).append(SequenceUpdate(
                    sequence.baseline, sequence.tokens[len(sequence.tokens) - sequence.fresh :],
                    sequence.logprobs[len(sequence.logprobs) - sequence.fresh :], sequence.finish_reason, sequence.text))
            sequence.fresh = 0
        for sequence in stepped:
            if sequence.handle.id in updates and sequence.handle.on_update is not None:
                sequence.handle.on_update(updates.pop(sequence.handle.id))
        for sequence in finished:
            self.tokens_in_flight -= sequence.tokens_needed
            handle = sequence.handle
            if all(s.result is not None for s in handle.sequences) and handle.result is None:
                main = next(s for s in handle.sequences if not s.baseline)
                baseline = next((s for s in handle.sequences if s.baseline), None)
                handle.result = main.result
                if baseline is not None:
                    handle.result.baseline = baseline.result
                handle.sequences = []
                self._notify_done(handle)

    def fail_all(self, error: Exception) -> None:
        """Fail every running and waiting request with ``error`` and start again with an empty
        batch (after a step raised: its state can no longer be trusted)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            self._cancel = []
        running = {id(s.handle): s.handle for s in self.batch.sequences}
        self.batch = RunningBatch(self.engine.model, self.limits.max_running_rows, self.batch.pad_id)
        self.tokens_in_flight = 0
        for handle in [*running.values(), *waiting]:
            handle.sequences = []
            self._fail(handle, error)

    def _fail(self, handle: RequestHandle, error: Exception) -> None:
        handle.error = error
        self._notify_done(handle)

    def _notify_done(self, handle: RequestHandle) -> None:
        self.observer.finished(handle)
        if handle.on_done is not None:
            handle.on_done(handle)
