"""The model deployment: one model and its dictionaries a replica, served by a continuous-batching
scheduler that runs in a thread of its own (:class:`~service.model_server.ModelServer`).

Each request is checked, queued with the scheduler and awaited on its own: a plain request
waits for its result, a streamed one receives what every step produced for it, several
steps' worth in one message when the consumer fell behind. When the caller goes away (the
HTTP client disconnects, so Serve cancels this call) the request is cancelled inside the
scheduler and its row leaves the batch at the next step. The replica follows the
hot-deployment registry from a background thread and sends its metrics with every
heartbeat.
"""

import asyncio
import threading
import time

from ray import serve

from service.metrics import ReplicaMetrics
from service.model_server import DeltaStreamer, Limits, ModelConfig, ModelServer
from service.protocol import ApiError, CompletionRequest, GenerateRequest, InspectRequest

HEALTHY_WITHIN_S = 60.0  # a scheduler step (bounded by the prefill budget) never takes this long


@serve.deployment(max_ongoing_requests=256)
class ModelDeployment:
    def __init__(self, config: dict, limits: dict, registry_name: str | None = None, build: str = ""):
        import ray

        from dictionaries.store import DictionaryStore
        from service.registry import registry
        from service.registry import registry_name as own_registry

        config = ModelConfig(**config)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id  # the id Serve's controller lists it under
        self.metrics = ReplicaMetrics(config.name)
        self.registry_name, self.build = own_registry(registry_name), build
        # Which versions to serve: the first replica of a new build starts from what the store holds
        # for the configured dictionaries; a replica joining a running build (a restart, a scale-up)
        # serves the versions deployed there — pinned in the store, whatever was uploaded since.
        store = DictionaryStore()
        stored = {name: store.version(name) for name in config.dictionaries}
        state = ray.get(registry(self.registry_name).initialise.remote(config.name, stored, build))
        self.server = ModelServer(config, Limits(**limits), observer=self.metrics, versions=state["names"])
        failed = {name: error for name, error in self.server.load_errors.items() if name in config.dictionaries}
        if failed and state.get("reset"):
            raise RuntimeError("; ".join(f"dictionary {name!r}: {error}" for name, error in failed.items()))
        if state.get("reset"):  # the deployed versions of this build are the ones just loaded
            for name, served in self.server.served.items():
                store.pin(self.registry_name, config.name, name, served["path"])
            for name in set(store.pins(self.registry_name, config.name)) - set(self.server.served):
                store.unpin(self.registry_name, config.name, name)
        threading.Thread(target=self._follow_registry, args=(state,), daemon=True, name="steerserve-registry").start()

    def _follow_registry(self, state: dict) -> None:
        """Keep this replica's dictionaries equal to the registry's desired versions (hot
        deployment), and report the versions served and this replica's metrics with every heartbeat."""
        import ray

        from service.registry import HEARTBEAT_S, registry

        model = self.server.config.name
        actor, applied, errors = None, state["version"], dict(self.server.load_errors)
        while True:
            try:
                actor = actor or registry(self.registry_name)
                if state is None:
                    state = ray.get(actor.initialise.remote(model, self.server.versions(), self.build))
                if state["version"] != applied:
                    errors = self.server.sync(state["names"])
                    applied = state["version"]
                actor.ack.remote(model, self.replica, applied, self.server.versions(), errors, self.metrics.text())
                time.sleep(HEARTBEAT_S)
                state = ray.get(actor.state.remote(model))
                if state["token"] is None:  # a registry that lost its state learns it from the replicas again
                    state = None
            except Exception:  # the registry restarting must not kill the replica: find it again
                actor = None
                time.sleep(1.0)

    async def check_dictionary(self, name: str) -> dict:
        """Whether ``name`` (in the store) can be served by this model: errors and warnings."""
        try:
            report = await asyncio.to_thread(self.server.compatibility, name)
        except Exception as err:
            return {"errors": [str(err)], "warnings": []}
        return {"errors": report.errors, "warnings": report.warnings}

    async def _call(self, fn, *args) -> dict:
        """Run ``fn``; an :class:`ApiError` comes back as data (exceptions do not cross handles well)."""
        try:
            return {"ok": await fn(*args)}
        except ApiError as err:
            return err.as_data()

    def _submit(self, request: GenerateRequest, events: asyncio.Queue, stream: bool):
        """Check and queue ``request``; its end (and, streamed, every step's update) arrive on ``events``."""
        loop = asyncio.get_running_loop()

        def put(kind):
            return lambda payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        return self.server.submit(self.server.check(request), on_update=put("update") if stream else None,
                                  on_done=put("done"))

    async def generate(self, request: GenerateRequest) -> dict:
        async def work():
            events: asyncio.Queue = asyncio.Queue()
            handle = self._submit(request, events, stream=False)
            try:
                await events.get()
            finally:
                if not handle.done:  # cancelled: the caller went away
                    self.server.cancel(handle)
            if handle.error is not None:
                raise self.server.request_error(handle.error)
            return self.server.response(handle.result)
        return await self._call(work)

    async def complete(self, body: CompletionRequest, edits: list) -> dict:
        """A non-streamed completion: every prompt is its own request in the scheduler (batched
        with everything else), under ``edits``; the answer is OpenAI's ``choices`` and ``usage``."""
        from service.completions import completion_body, engine_requests

        async def work():
            requests = engine_requests(self.server, body, edits)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            handles = []
            try:
                for request in requests:
                    handles.append(self.server.submit(
                        request, on_done=lambda _: loop.call_soon_threadsafe(events.put_nowait, None)))
                for _ in handles:
                    await events.get()
            finally:
                for handle in handles:
                    if not handle.done:  # cancelled (the caller went away) or a later prompt was refused
                        self.server.cancel(handle)
            for handle in handles:
                if handle.error is not None:
                    raise self.server.request_error(handle.error)
            return await asyncio.to_thread(completion_body, self.server, body, [h.result for h in handles])
        return await self._call(work)

    async def generate_stream(self, request: GenerateRequest):
        """Yield ``{"delta", "baseline_delta", "token_ids", "baseline_token_ids"}`` while the request
        runs (one message for what one or more steps produced), then ``{"final": response, ...}`` with
        the rest; or one ``{"error": ...}``. Deltas and token ids concatenate to the final texts and
        token lists."""
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = self._submit(request, events, stream=True)
        except ApiError as err:
            yield err.as_data()
            return
        tokenizer = self.server.loaded.tokenizer
        streams = {False: (DeltaStreamer(tokenizer, list(request.stop)), []),
                   True: (DeltaStreamer(tokenizer, list(request.stop)), [])}
        sent, counted = {False: "", True: ""}, {False: 0, True: 0}  # what earlier messages carried
        deltas, new_tokens = {False: "", True: ""}, {False: [], True: []}  # not sent yet
        interval, last_sent = self.server.limits.stream_interval_s, None
        try:
            while True:
                wait = None  # a message is due: wait for the next event; else only until it is
                if last_sent is not None and (new_tokens[False] or new_tokens[True]):
                    wait = max(0.0, last_sent + interval - time.monotonic())
                items = []
                try:
                    items.append(await asyncio.wait_for(events.get(), wait) if wait != 0.0 else events.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    pass
                while not events.empty():
                    items.append(events.get_nowait())
                finished = None
                for kind, payload in items:
                    if kind == "done":
                        finished = payload
                        continue
                    for update in payload:
                        streamer, tokens = streams[update.baseline]
                        tokens.extend(update.tokens)
                        new_tokens[update.baseline] += update.tokens
                        deltas[update.baseline] += streamer.update(tokens, update.finish_reason, update.text)
                if finished is not None:  # the rest of both texts and token lists
                    if finished.error is not None:
                        yield self.server.request_error(finished.error).as_data()
                        return
                    response = self.server.response(finished.result)
                    baseline = response["baseline"] or {"text": "", "tokens": []}
                    yield {"final": response, "delta": response["text"][len(sent[False]):],
                           "baseline_delta": baseline["text"][len(sent[True]):],
                           "token_ids": response["tokens"][counted[False]:],
                           "baseline_token_ids": baseline["tokens"][counted[True]:]}
                    return
                due = last_sent is None or time.monotonic() - last_sent >= interval
                if (new_tokens[False] or new_tokens[True]) and due:
                    message = {"delta": deltas[False], "baseline_delta": deltas[True], "token_ids": new_tokens[False],
                               "baseline_token_ids": new_tokens[True]}
                    for baseline in (False, True):
                        sent[baseline] += deltas[baseline]
                        counted[baseline] += len(new_tokens[baseline])
                    deltas, new_tokens = {False: "", True: ""}, {False: [], True: []}
                    last_sent = time.monotonic()
                    yield message
        finally:
            if not handle.done:  # the consumer went away (client disconnected): free the row
                self.server.cancel(handle)

    async def check_edits(self, edits: list) -> dict:
        """Whether ``edits`` can run on this replica now, by the checks every request goes through
        (dictionaries deployed, features in range, conditions, units, steering vectors): a stored
        preset is checked exactly as its use will be."""
        def check():
            self.server.check(GenerateRequest(prompt="x", max_new_tokens=1, edits=edits))
            return True
        return await self._call(lambda: asyncio.to_thread(check))

    async def metrics_text(self) -> str:
        return self.metrics.text()

    async def inspect(self, request: InspectRequest) -> dict:
        return await self._call(lambda: asyncio.to_thread(self.server.inspect, request))

    async def describe(self) -> dict:
        return {"ok": self.server.model_card()}

    async def dictionaries(self) -> dict:
        return {"ok": [self.server.dictionary_summary(n) for n in sorted(self.server.engine.dictionaries)]}

    async def dictionary(self, name: str) -> dict:
        return await self._call(lambda: asyncio.to_thread(self.server.dictionary_detail, name))

    async def feature(self, name: str, index: int) -> dict:
        return await self._call(lambda: asyncio.to_thread(self.server.feature, name, index))

    async def search(self, request) -> dict:
        return await self._call(lambda: asyncio.to_thread(self.server.steering.search, request))

    async def contrast(self, request) -> dict:
        return await self._call(lambda: asyncio.to_thread(self.server.steering.contrast, request))

    async def compare(self, a: str, b: str, threshold: float, offset: int, limit: int) -> dict:
        return await self._call(lambda: asyncio.to_thread(self.server.steering.compare, a, b, threshold, offset, limit))

    def check_health(self) -> None:
        """Liveness without waiting for the model: the engine's thread is between steps often."""
        if not self.server.loop.alive(HEALTHY_WITHIN_S):
            raise RuntimeError(f"the engine loop has not completed a step in {HEALTHY_WITHIN_S:.0f} s")
