"""The one table of routes: each route's role and the statuses it answers, declared once where
the route is defined, with ``@route``:

    @route("POST", "/v1/inspect", role="user", errors=(400, 404), body=InspectRequest)
    async def inspect(self, request: Request): ...

From that one declaration the route gets its access check (the role: ``public``, ``user`` or
``admin``), its request counting for ``/metrics``, its ``/openapi.json`` entry with every status
it can return documented with the error envelope's schema (the role adds 401/403/429, every
route may answer 500), and its row in the access matrix that the tests check and the README
shows (``python -m service.routes.table`` prints it). A new route joins all of these by being
declared with ``@route``; the access-matrix test then asks for a probe request for it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from starlette.routing import compile_path

from service.http import _request_body, app, counted

ENVELOPE_REF = {"$ref": "#/components/schemas/ErrorEnvelope"}
REASONS = {400: "Bad request: the envelope's `param` names the field", 401: "Missing or unknown API key",
           403: "The key's role may not call this", 404: "No such resource (the envelope's `param` says which)",
           409: "Conflict with the resource's current state", 413: "Request body over the size limit",
           429: "Over the key's rate limit or job quota (see `Retry-After`)", 500: "Server fault (no stack trace)",
           503: "Overloaded or not ready (see `Retry-After` when given)"}
ROLE_ERRORS = {"public": (), "user": (401, 429), "admin": (401, 403, 429)}
COLUMNS = ("no key", "user", "admin", "over-rate")
"""The access matrix's callers: no key, a user key, an admin key, a user key over its rate."""


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    role: str
    """``public`` (no key), ``user`` or ``admin``."""
    errors: tuple[int, ...]
    """The statuses other than ``ok`` this route can answer, access ones included."""
    ok: int = 200
    streams: bool = False
    """Whether the ok answer may be server-sent events."""
    media: str = "application/json"
    """The ok answer's media type."""

    def expected(self, column: str) -> int | str:
        """The access matrix: the status a caller of ``column`` gets, or ``"ok"`` when access is
        granted (the route then answers whatever the request deserves)."""
        if self.role == "public":
            return "ok"
        if column == "no key":
            return 401
        if self.role == "admin" and column in ("user", "over-rate"):
            return 403
        return 429 if column == "over-rate" else "ok"


ROUTES: list[RouteSpec] = []
PUBLIC_FRAMEWORK_ROUTES = (RouteSpec("GET", "/openapi.json", "public", ()), RouteSpec("GET", "/docs", "public", ()),
                           RouteSpec("GET", "/", "public", (), media="text/html"),
                           RouteSpec("GET", "/ui/{asset}", "public", (404,)))
"""Pages, not API operations: FastAPI's schema and docs, the browser page and its assets (service/ui.py).
Not in the schema, open to anyone, listed in the matrix all the same."""


def _responses(spec: RouteSpec) -> dict:
    responses = {}
    if spec.media != "application/json":
        responses[spec.ok] = {"description": "OK", "content": {spec.media: {"schema": {"type": "string"}}}}
    if spec.streams:
        responses[spec.ok] = {"description": "JSON, or server-sent events when `stream` is true",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}}
    for status in spec.errors:
        responses[status] = {"description": REASONS.get(status, "Error"),
                             "content": {"application/json": {"schema": ENVELOPE_REF}}}
    return responses


def route(method: str, path: str, *, role: str, errors: tuple[int, ...] = (), body=None, ok: int = 200,
          streams: bool = False, media: str = "application/json", request_body: dict | None = None,
          openapi_extra: dict | None = None, response_model=None):
    """Declare, guard, count and document a route method (see the module docstring). ``body``: the
    pydantic model of a JSON body; ``request_body``: an OpenAPI requestBody for anything else;
    ``openapi_extra``: more of the operation's OpenAPI (e.g. query ``parameters`` a route reads
    itself); ``response_model``: the ok answer's schema."""
    if role not in ROLE_ERRORS:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLE_ERRORS)}")
    reads_body = body is not None or request_body is not None
    statuses = tuple(sorted({*errors, *ROLE_ERRORS[role], 500} | ({413} if reads_body else set())))
    spec = RouteSpec(method, path, role, statuses, ok, streams, media)
    if any((s.method, s.path) == (method, path) for s in ROUTES):
        raise ValueError(f"{method} {path} is declared twice")
    ROUTES.append(spec)
    extra = _request_body(body) if body is not None else {}
    if request_body is not None:  # a body that is not one pydantic model (a multipart upload)
        extra["requestBody"] = request_body
    if role != "public":
        extra["security"] = [{"bearer": []}]
    extra.update(openapi_extra or {})

    def wrap(fn):
        if role != "public" and "request" not in inspect.signature(fn).parameters:
            raise TypeError(f"{method} {path}: a {role} route takes `request: Request` (the access check reads it)")

        @functools.wraps(fn)
        async def guarded(self, *args, **kwargs):
            if role != "public":
                request = kwargs["request"]
                request.state.caller = self._allow(request, role)
            return await fn(self, *args, **kwargs)

        register = getattr(app, method.lower())
        return register(path, status_code=ok, responses=_responses(spec), openapi_extra=extra or None,
                        response_model=response_model)(counted(method, path)(guarded))
    return wrap


def allowed_methods(path: str) -> set[str]:
    """Every method some route takes on ``path`` (a 405's ``Allow``)."""
    return {spec.method for spec in ROUTES + list(PUBLIC_FRAMEWORK_ROUTES) if compile_path(spec.path)[0].match(path)}


def markdown() -> str:
    """The access matrix as the README shows it."""
    rows = ["| endpoint | role | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for spec in sorted(ROUTES + list(PUBLIC_FRAMEWORK_ROUTES), key=lambda s: (s.path, s.method)):
        cells = [("✓" if (value := spec.expected(column)) == "ok" else str(value)) for column in COLUMNS]
        rows.append(f"| `{spec.method} {spec.path}` | {spec.role} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import service.ingress  # noqa: F401 - declares every route
    from service.routes import table  # the module the routes registered with (this one runs as __main__)

    print(table.markdown(), end="")
