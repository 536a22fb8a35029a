"""Generation routes: native ``/v1/generate`` (optionally streamed), OpenAI-compatible
``/v1/completions`` (optionally streamed) and ``/v1/inspect``.

Every one takes ``"model": "BASE+PRESET"`` (a stored steering preset): the preset's edits
come first, the request's own after them (:mod:`service.routes.presets`). A non-streamed
completion may hold several prompts (each its own choice, each its own request in the
scheduler), echo the prompt and score it (``logprobs``); see :mod:`service.completions`.

A streamed answer is server-sent events relayed from the model replica: one event for what
one or more scheduler steps produced, the last one with the full result, then
``data: [DONE]``. A stream that ends any other way (the replica died, an internal error)
ends with an error event and no ``[DONE]``, so a client can tell truncated output from
complete output. When the client disconnects, Serve cancels this handler; the stream from
the replica is cancelled with it and the request's row leaves the batch at the next step.
"""

import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from service.http import METRICS, _unwrap
from service.presets import merged_edits, preset_error
from service.protocol import ApiError, CompletionRequest, GenerateRequest, InspectRequest, error_body, validation_param
from service.routes.table import route

logger = logging.getLogger(__name__)


def sse(body) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def relay(stream, first: dict, render):
    """Server-sent events from the replica's messages: ``render(message)`` for each, then
    ``[DONE]``; an error event instead when the stream breaks."""
    message = first
    try:
        while True:
            if "error" in message:
                yield sse(message["error"])
                return
            event = render(message)
            if event is not None:
                yield sse(event)
            if "final" in message:
                break
            message = await stream.__anext__()
        yield sse("[DONE]")
    except StopAsyncIteration:
        yield sse(error_body("server_error", "the stream ended before the request finished"))
    except Exception as err:  # noqa: BLE001 - the replica died or failed: tell the client, do not pretend
        logger.warning("stream broken: %s", err)
        yield sse(error_body("server_error", f"the stream broke ({type(err).__name__}); the output is incomplete"))
    finally:
        stream.cancel()  # a no-op when it finished; frees the row when the client went away


def _in_completion_terms(err: ApiError) -> ApiError:
    """A streamed completion is checked as the native request it becomes: name its fields as the
    caller did (``max_tokens``, not ``max_new_tokens``)."""
    if err.param == "max_new_tokens":
        err.param, err.message = "max_tokens", err.message.replace("max_new_tokens", "max_tokens")
    return err


class GenerationRoutes:
    async def _open_stream(self, handle, native: GenerateRequest):
        """The replica's message stream and its first message; a refusal is a plain 4xx/503."""
        stream = handle.options(stream=True).generate_stream.remote(native)
        first = await stream.__anext__()
        if "error" in first:
            stream.cancel()
            _unwrap(first)
        return stream, first

    @staticmethod
    def _unwrap_steered(result: dict, preset):
        try:
            return _unwrap(result)
        except ApiError as err:
            raise preset_error(err, preset) from None

    @route("POST", "/v1/generate", role="user", errors=(400, 404, 409, 503), body=GenerateRequest, streams=True)
    async def generate(self, request: Request):
        body = await self._body(request, GenerateRequest)
        name, base, handle, preset = self._steer(body.model)
        if preset is not None:
            body = body.model_copy(update={"model": base, "edits": merged_edits(preset, body.edits)})
        if not body.stream:
            result = self._unwrap_steered(await handle.generate.remote(body), preset)
            METRICS.count_work(base, len(result["tokens"]), body.edits)
            return {**result, "model": name}
        try:
            stream, first = await self._open_stream(handle, body)
        except ApiError as err:
            raise preset_error(err, preset) from None

        def render(message: dict) -> dict:
            step = {key: message[key] for key in ("delta", "baseline_delta", "token_ids", "baseline_token_ids")}
            if "final" in message:
                METRICS.count_work(name, len(message["final"]["tokens"]), body.edits)
                return {**message["final"], **step}
            return step

        return StreamingResponse(relay(stream, first, render), media_type="text/event-stream")

    @route("POST", "/v1/completions", role="user", errors=(400, 404, 409, 503), body=CompletionRequest, streams=True)
    async def completions(self, request: Request):
        body = await self._body(request, CompletionRequest)
        name, base, handle, preset = self._steer(body.model)
        edits = merged_edits(preset, body.edits)
        completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage_of(result: dict) -> dict:
            return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": len(result["tokens"]),
                    "total_tokens": result["prompt_tokens"] + len(result["tokens"])}

        if not body.stream:
            answer = self._unwrap_steered(await handle.complete.remote(body, edits), preset)
            METRICS.count_work(base, answer["usage"]["completion_tokens"], edits)
            return {"id": completion_id, "object": "text_completion", "created": created, "model": name, **answer}

        try:
            native = body.to_generate().model_copy(update={"model": base, "edits": edits})
        except ValidationError as err:
            first = err.errors()[0]
            raise ApiError(400, first["msg"], param=validation_param(tuple(first["loc"]))) from None
        try:
            stream, first = await self._open_stream(handle, native)
        except ApiError as err:
            raise preset_error(_in_completion_terms(err), preset) from None

        def render(message: dict) -> dict | None:
            result = message.get("final")
            if result is None and not message["delta"]:
                return None  # OpenAI's chunks carry text: a step whose text is held back sends nothing
            chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": name,
                     "choices": [{"text": message["delta"], "index": 0, "logprobs": None,
                                  "finish_reason": result["finish_reason"] if result else None}]}
            if result:
                METRICS.count_work(base, len(result["tokens"]), edits)
                chunk["usage"] = usage_of(result)
                chunk["edit_report"] = result["edit_report"]
            return chunk

        return StreamingResponse(relay(stream, first, render), media_type="text/event-stream")

    @route("POST", "/v1/inspect", role="user", errors=(400, 404, 409, 503), body=InspectRequest)
    async def inspect(self, request: Request):
        body = await self._body(request, InspectRequest)
        _, _, handle, _ = self._steer(body.model)  # a preset's base model (inspect reads features before edits)
        return _unwrap(await handle.inspect.remote(body))
