"""Receiving a dictionary upload (``PUT /v1/dictionaries/{name}``): a multipart form streamed to
disk as it arrives, never held in memory, with every write off the event loop.

Bytes are counted as they arrive, so a chunked body without ``Content-Length`` is cut off at
the limit like any other (413). The parts land in a staging directory of the store (same
file system), which is always removed afterwards, whatever happened; the store then
validates and installs a copy atomically (:meth:`dictionaries.store.DictionaryStore.put`),
so a refused or failed upload changes nothing under the name.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.protocol import ApiError

PARTS = ("config.json", "sae.safetensors", "metrics.json")
REQUIRED = ("config.json", "sae.safetensors")


class _Writer:
    """Applies the parser's events (open a part, data, close) to files; runs in a worker thread."""

    def __init__(self, directory: Path):
        self.directory, self.current = directory, None

    def apply(self, events: list[tuple[str, object]]) -> None:
        for op, argument in events:
            if op == "open":
                self.current = open(self.directory / argument, "xb")  # a part twice: FileExistsError
            elif op == "data":
                self.current.write(argument)
            else:
                self.current.close()
                self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


async def receive_parts(request, directory: Path, limit: int) -> set[str]:
    """Stream ``request``'s multipart body into ``directory`` (one file a part); the part names.

    Caller errors are :class:`ApiError` 400 (naming the part) or 413; a failing disk raises
    ``OSError`` for the caller to answer."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(400, "expected a multipart/form-data body with the parts config.json and sae.safetensors")
    events: list[tuple[str, object]] = []
    seen: set[str] = set()
    part: dict = {"headers": {}, "field": b"", "value": b""}

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        part["headers"][part["field"].lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def on_headers_finished():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if name not in PARTS:
            raise ApiError(400, f"unexpected part {name[:64]!r}; the parts are {', '.join(PARTS)}", param=name[:64] or None)
        if name in seen:
            raise ApiError(400, f"the part {name!r} appears twice", param=name)
        seen.add(name)
        events.append(("open", name))

    def on_part_data(data, start, end):
        events.append(("data", bytes(data[start:end])))

    def on_part_end():
        events.append(("close", None))
        part["headers"] = {}

    parser = MultipartParser(options[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    writer, size = _Writer(directory), 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"upload is over {limit} bytes", type="request_too_large")
            try:
                parser.write(chunk)
            except MultipartParseError as err:
                raise ApiError(400, f"the multipart body is malformed ({err})") from None
            if events:
                batch, events[:] = list(events), []
                await asyncio.to_thread(writer.apply, batch)
        try:
            parser.finalize()
        except MultipartParseError as err:
            raise ApiError(400, f"the multipart body is malformed ({err})") from None
        if events:
            await asyncio.to_thread(writer.apply, list(events))
    finally:
        writer.close()
    for required in REQUIRED:
        if required not in seen:
            raise ApiError(400, f"the multipart form has no part named {required!r}", param=required)
    return seen
