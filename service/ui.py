"""The routes the browser page adds to the ingress: the page itself, ``/v1/whoami`` and feature search.

    GET /                                   the page (plain HTML, CSS and ES modules from service/ui/)
    GET /ui/{asset}                         its assets; nothing is loaded from anywhere else
    GET /v1/whoami                          the caller's role, so the page shows only what the key may do
    GET /v1/dictionaries/{name}/features    feature search: ?q=WORDS&limit=N (see service/feature_search.py)

The page and its assets are public plain routes outside the API schema (the access matrix lists
them with FastAPI's own pages); ``/v1/whoami`` and feature search are API routes of the
:class:`PageRoutes` mixin, declared in the route table like every other. The page holds no
data; every API call it makes carries the key the user typed, kept in sessionStorage.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.feature_search import query_terms
from service.http import _unwrap, app, counted
from service.protocol import ApiError, FeatureSearchResponse, WhoAmI
from service.routes.table import route

ASSETS = Path(__file__).with_name("ui")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# The page may talk to this server only: no CDN, no inline script, no third-party anything.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
MAX_QUERY_CHARS = 200
MAX_SEARCH_LIMIT = 100
SEARCH_PARAMS = ("q", "limit", "model")

_SEARCH_PARAMETERS = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "A dictionary loaded on a served model."},
    {"name": "q", "in": "query", "required": True,
     "schema": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
     "description": "Words to find in the features' promoted logit-lens tokens and top-context text "
                    "(case-insensitive; a word also matches longer words it begins)."},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_LIMIT, "default": 20},
     "description": "How many hits to return, best first."},
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "The served model the dictionary is loaded on; default: the first that has it."},
]


def stored_dictionaries(loaded: list[dict]) -> list[dict]:
    """Store entries that no served model has loaded, shaped like ``GET /v1/dictionaries``' entries
    with ``"deployed": false`` (for ``?stored=true``)."""
    from dictionaries.store import DictionaryStore

    store, names = DictionaryStore(), {entry["name"] for entry in loaded}
    entries = []
    for name in store.names():
        if name in names:
            continue
        try:
            info = store.info(name)
        except Exception as err:  # a broken store entry is listed, not fatal to the listing
            entries.append({"name": name, "deployed": False, "error": str(err)})
            continue
        config = info["config"]
        entries.append({"name": name, "model": (config.get("model") or {}).get("name"),
                        "architecture": config.get("architecture"), "hook": config.get("hook"),
                        "d_in": config.get("d_in"), "d_sae": config.get("d_sae"), "k": config.get("k"),
                        "metrics": {k: v for k, v in (info["metrics"] or {}).items() if isinstance(v, (int, float))},
                        "warnings": [], "deployed": False})
    return entries


def _asset(name: str) -> Path | None:
    path = ASSETS / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        return None
    return path


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
@counted("GET", "/")
async def page(request: Request):
    if not request.url.path.endswith("/"):  # mounted under a prefix: relative asset URLs need the slash
        return RedirectResponse(request.url.path + "/", status_code=307)
    return HTMLResponse((ASSETS / "index.html").read_text(), headers=SECURITY_HEADERS)


@app.get("/ui/{asset}", include_in_schema=False)
@counted("GET", "/ui/{asset}")
async def asset(request: Request):
    name = request.path_params["asset"]
    path = _asset(name)
    if path is None:
        raise ApiError(404, f"the page has no asset {name!r}", type="not_found_error", param="asset")
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


class PageRoutes:
    """The API routes the page needs: who the caller is, and feature search."""

    @route("GET", "/v1/whoami", role="user", response_model=WhoAmI)
    async def whoami(self, request: Request) -> dict:
        """The caller's role (an open server answers admin, ``open: true``)."""
        key = request.state.caller
        if key is None:
            return {"role": "admin", "name": None, "open": True}
        return {"role": key.role, "name": key.name, "open": False}

    @route("GET", "/v1/dictionaries/{name}/features", role="user", errors=(400, 404, 409, 503),
           openapi_extra={"parameters": _SEARCH_PARAMETERS}, response_model=FeatureSearchResponse)
    async def search_features(self, name: str, request: Request) -> dict:
        """Rank a dictionary's features by matches of `q` in their promoted logit-lens tokens and top-context
        text, from the dictionary's recorded statistics (`features.safetensors`). The index is built once a
        dictionary, on its first search, and rebuilt when the dictionary is redeployed."""
        params = request.query_params
        unknown = sorted(set(params) - set(SEARCH_PARAMS))
        if unknown:
            raise ApiError(400, f"unknown query parameter {unknown[0]!r} (known: {', '.join(SEARCH_PARAMS)})",
                           param=unknown[0])
        query = params.get("q", "")
        if not query.strip():
            raise ApiError(400, "q: give the words to search for (e.g. ?q=file)", param="q")
        if len(query) > MAX_QUERY_CHARS:
            raise ApiError(400, f"q is {len(query)} characters; at most {MAX_QUERY_CHARS}", param="q")
        if not query_terms(query)[0]:
            raise ApiError(400, "q has no word or punctuation to search for", param="q")
        limit_text = params.get("limit", "20")
        if not limit_text.strip().isdigit() or not 1 <= int(limit_text) <= MAX_SEARCH_LIMIT:
            raise ApiError(400, f"limit must be an integer in [1, {MAX_SEARCH_LIMIT}]; got {limit_text!r}",
                           param="limit")
        model = await _model_serving(self, name, params.get("model"))
        index = await asyncio.to_thread(self.feature_indexes.get, model, name)
        if index is None:
            raise ApiError(409, f"dictionary {name!r} has no feature statistics (features.safetensors), so its "
                                "features cannot be searched; dictionaries trained by steerserve record them",
                           param="name")
        found = await asyncio.to_thread(index.search, query, int(limit_text))
        return {"object": "list", "dictionary": name, "model": model, "query": query, **found}


async def _model_serving(ingress, name: str, model: str | None) -> str:
    """The served model that has ``name`` loaded (``model`` if given), or a 404."""
    candidates = [ingress._handle(model)[0]] if model else list(ingress.models)
    loaded = {}
    for candidate in candidates:
        card = _unwrap(await ingress.models[candidate].describe.remote())
        if name in card["dictionaries"]:
            return candidate
        loaded[candidate] = card["dictionaries"]
    where = "; ".join(f"{m}: {', '.join(names) or 'none'}" for m, names in loaded.items())
    raise ApiError(404, f"dictionary {name!r} is not loaded (loaded — {where})", type="not_found_error",
                   param="name")
