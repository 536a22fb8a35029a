"""The model deployment: loads one model and its dictionaries once a replica, gathers concurrent
requests with ``@serve.batch`` into engine batches that run off the event loop, streams text
deltas while a batch runs, and follows the hot-deployment registry between batches."""

import asyncio
import threading
import time
import uuid

from ray import serve

from service.metrics import model_registry
from service.model_server import DeltaStreamer, Limits, ModelConfig, ModelServer
from service.protocol import ApiError, GenerateRequest, InspectRequest


@serve.deployment(max_ongoing_requests=64)
class ModelDeployment:
    def __init__(self, config: dict, limits: dict, registry_name: str | None = None):
        self.server = ModelServer(ModelConfig(**config), Limits(**limits))
        self.metrics = model_registry()
        self.registry_name = registry_name
        if registry_name:
            threading.Thread(target=self._follow_registry, daemon=True, name="steerserve-registry").start()

    def _follow_registry(self) -> None:
        """Keep this replica's dictionaries equal to the registry's desired set (hot deployment)."""
        import ray

        from service.registry import HEARTBEAT_S, registry

        replica, model = uuid.uuid4().hex, self.server.config.name
        actor = registry(self.registry_name)
        state = ray.get(actor.initialise.remote(model, sorted(self.server.engine.dictionaries)))
        applied, errors = 0, {}
        while True:
            try:
                if state["version"] != applied:
                    errors = self.server.sync(state["names"])
                    applied = state["version"]
                actor.ack.remote(model, replica, applied, errors)
                time.sleep(HEARTBEAT_S)
                state = ray.get(actor.state.remote(model))
            except Exception:  # the registry restarting must not kill the replica
                time.sleep(1.0)

    async def check_dictionary(self, name: str) -> dict:
        """Whether ``name`` (in the store) can be served by this model: errors and warnings."""
        try:
            report = await asyncio.to_thread(self.server.compatibility, name)
        except Exception as err:
            return {"errors": [str(err)], "warnings": []}
        return {"errors": report.errors, "warnings": report.warnings}
        self._batched.set_max_batch_size(self.server.limits.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.server.limits.batch_wait_timeout_s)

    async def _call(self, fn, *args) -> dict:
        """Run ``fn``; an :class:`ApiError` comes back as data (exceptions do not cross handles well)."""
        try:
            return {"ok": await fn(*args)}
        except ApiError as err:
            return {"error": err.body(), "status": err.status}

    async def generate(self, request: GenerateRequest, text_pieces: bool = False) -> dict:
        async def work():
            engine_request = self.server.check(request)
            result = await self._batched(engine_request)
            if isinstance(result, ApiError):
                raise result
            return self.server.response(result, text_pieces=text_pieces)
        return await self._call(work)

    async def generate_stream(self, request: GenerateRequest):
        """Yield ``{"delta": text}`` while the request's batch runs, then ``{"final": response, "delta": rest}``;
        or one ``{"error": ...}``. The deltas concatenate to the final text."""
        try:
            engine_request = self.server.check(request)
        except ApiError as err:
            yield {"error": err.body(), "status": err.status}
            return
        item = _Streamed(engine_request, list(request.stop))
        task = asyncio.ensure_future(self._batched(item))
        sent = ""
        while not task.done() or not item.queue.empty():
            getter = asyncio.ensure_future(item.queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                sent += getter.result()
                yield {"delta": getter.result()}
            else:
                getter.cancel()
        if isinstance(task.result(), ApiError):
            yield {"error": task.result().body(), "status": task.result().status}
            return
        response = self.server.response(task.result())
        yield {"final": response, "delta": response["text"][len(sent):]}

    async def metrics_text(self) -> str:
        return self.metrics.render()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list) -> list:
        self.metrics.observe("steerserve_batch_size", len(items), model=self.server.config.name)
        self.metrics.inc("steerserve_batches_total", model=self.server.config.name)
        requests = [item.request if isinstance(item, _Streamed) else item for item in items]
        streamed = {i: item for i, item in enumerate(items) if isinstance(item, _Streamed)}
        if not streamed:
            return await asyncio.to_thread(self.server.generate_batch, requests)
        loop = asyncio.get_running_loop()
        for item in streamed.values():
            item.streamer = DeltaStreamer(self.server.loaded.tokenizer, item.stops)

        def on_step(progress: dict) -> None:  # in the engine's thread, after every step; index -> state
            for i, item in streamed.items():
                if i not in progress:
                    continue
                tokens, finish_reason, stopped_text = progress[i]
                if item.finished:
                    continue
                delta = item.streamer.update(tokens, finish_reason, stopped_text)
                if delta:
                    loop.call_soon_threadsafe(item.queue.put_nowait, delta)
                item.finished = finish_reason is not None

        return await asyncio.to_thread(self.server.generate_batch, requests, on_step)

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

    def check_health(self) -> None:
        if not self.server.lock.acquire(timeout=300):  # a wedged forward makes the replica unhealthy
            raise RuntimeError("the model has been busy for 5 minutes")
        self.server.lock.release()


class _Streamed:
    """A request whose text deltas go to ``queue`` while its batch runs."""

    def __init__(self, request, stops: list[str]):
        self.request, self.stops = request, stops
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streamer: DeltaStreamer | None = None
        self.finished = False
