"""Find-and-steer routes: search by example, contrast, steering vectors and dictionary comparison.

    POST   /v1/search                          the features most active on a span of a text (user)
    POST   /v1/contrast                        features separating two sets of texts, and their
                                               difference-of-means vector (user; save_vector: admin)
    GET    /v1/vectors[/{name}]                stored steering vectors (user)
    PUT    /v1/vectors/{name}                  store a steering vector (admin)
    DELETE /v1/vectors/{name}                  remove one (admin)
    GET    /v1/dictionaries/{a}/compare/{b}    MMCS both ways, a one-to-one matching, paged pairs (user)

Every route declares the error statuses it can answer, with the error envelope, in the OpenAPI
schema. Model work runs on a model replica (the request's ``model``, default the first); the
vector store and comparisons need no model forward.
"""

import asyncio

from fastapi import Request

from service.http import _unwrap
from service.protocol import ApiError, ContrastRequest, SearchRequest, VectorUpload
from service.routes.table import route


COMPARE_PARAMETERS = [
    {"name": "threshold", "in": "query", "required": False, "schema": {"type": "number", "minimum": -1, "maximum": 1},
     "description": "List matched pairs whose decoder cosine is at least this (default 0.5)."},
    {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
     "description": "Skip this many listed pairs (default 0)."},
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
     "description": "List at most this many pairs (default 50)."},
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "The served model whose replica computes it; default: the first."},
]


class SteeringRoutes:
    @route("POST", "/v1/search", role="user", errors=(400, 404, 503), body=SearchRequest)
    async def search_by_example(self, request: Request) -> dict:
        """The features most active on a span of a text, by activation relative to each feature's
        recorded maximum (or by activation)."""
        body = await self._body(request, SearchRequest)
        _, handle = self._handle(body.model)
        return _unwrap(await handle.search.remote(body))

    @route("POST", "/v1/contrast", role="user", errors=(400, 403, 404, 503), body=ContrastRequest)
    async def contrast_sets(self, request: Request) -> dict:
        """Rank features by how they separate set A from set B (Hedges' g with its standard error),
        with the difference-of-means residual vector; ``save_vector`` stores it (admin)."""
        body = await self._body(request, ContrastRequest)
        if body.save_vector is not None:
            self._allow(request, "admin")
            self._vector_name(body.save_vector, "save_vector")
        name, handle = self._handle(body.model)
        result = _unwrap(await handle.contrast.remote(body))
        if body.save_vector is not None:
            from dictionaries.vectors import SteeringVector

            vector = result["vector"]
            provenance = {"contrast": {"dictionary": body.dictionary, "unit": body.unit, "sets": result["sets"],
                                       "a": body.a.model_dump(exclude_none=True, exclude={"texts"}) | _texts(body.a),
                                       "b": body.b.model_dump(exclude_none=True, exclude={"texts"}) | _texts(body.b)}}
            saved = SteeringVector(body.save_vector, vector["hook"], _tensor(vector["values"]),
                                   vector["model"]["name"], vector["model"]["sha256"], provenance)
            await asyncio.to_thread(self._vectors().put, saved)
            result["saved_vector"] = saved.describe()
        if not body.include_vector:
            result.pop("vector", None)
        return result

    # --- steering vectors ----------------------------------------------------------------------

    @staticmethod
    def _vectors():
        from dictionaries.vectors import VectorStore

        return VectorStore()

    @staticmethod
    def _vector_name(name: str, param: str = "name") -> str:
        from dictionaries.config import DictionaryError
        from dictionaries.store import validate_name

        try:
            return validate_name(name)
        except DictionaryError as err:
            raise ApiError(400, f"{param}: {str(err).replace('dictionary name', 'vector name')}", param=param) from None

    def _stored_vector(self, name: str):
        from dictionaries.vectors import VectorNotFound

        self._vector_name(name)
        try:
            return self._vectors().load(name)
        except VectorNotFound as err:
            raise ApiError(404, str(err), type="not_found_error", param="name") from None

    @route("GET", "/v1/vectors", role="user")
    async def list_vectors(self, request: Request) -> dict:
        from dictionaries.config import DictionaryError

        store, entries = self._vectors(), []
        for name in store.names():
            try:
                entries.append(store.load(name).describe())
            except DictionaryError as err:  # a damaged file is listed with its problem, not a 500
                entries.append({"name": name, "error": str(err)})
        return {"object": "list", "data": entries}

    @route("GET", "/v1/vectors/{name}", role="user", errors=(400, 404))
    async def get_vector(self, name: str, request: Request) -> dict:
        """A stored steering vector: hook, norm, provenance and its values."""
        return self._stored_vector(name).describe(values=True)

    @route("PUT", "/v1/vectors/{name}", role="admin", errors=(400, 404, 503), body=VectorUpload)
    async def put_vector(self, name: str, request: Request) -> dict:
        """Store a steering vector (admin); it must fit the model's width and layers."""
        from dictionaries.config import DictionaryError
        from dictionaries.vectors import SteeringVector

        self._vector_name(name)
        body = await self._body(request, VectorUpload)
        model_name, handle = self._handle(body.model)
        card = _unwrap(await handle.describe.remote())
        layer = int(body.hook.split(".")[1])
        if layer >= card["n_layers"]:
            raise ApiError(400, f"hook: {body.hook} does not exist on {model_name!r} ({card['n_layers']} layers)",
                           param="hook")
        if len(body.values) != card["d_model"]:
            raise ApiError(400, f"values: {len(body.values)} values; {model_name!r} has width {card['d_model']}",
                           param="values")
        provenance = {"uploaded": True} | ({"description": body.description} if body.description else {})
        try:
            vector = SteeringVector(name, body.hook, _tensor(body.values), card["id"], card["sha256"], provenance)
        except DictionaryError as err:
            raise ApiError(400, f"values: {err}", param="values") from None
        await asyncio.to_thread(self._vectors().put, vector)
        return vector.describe()

    @route("DELETE", "/v1/vectors/{name}", role="admin", errors=(400, 404))
    async def delete_vector(self, name: str, request: Request) -> dict:
        """Remove a stored steering vector (admin); requests naming it afterwards get a 400."""
        self._stored_vector(name)
        await asyncio.to_thread(self._vectors().delete, name)
        return {"name": name, "deleted": True}

    # --- dictionary comparison ----------------------------------------------------------------

    @route("GET", "/v1/dictionaries/{a}/compare/{b}", role="user", errors=(400, 404, 503),
           openapi_extra={"parameters": COMPARE_PARAMETERS})
    async def compare_dictionaries(self, a: str, b: str, request: Request) -> dict:
        """Compare two stored dictionaries: MMCS both ways (decoder and encoder), the Hungarian
        one-to-one matching by decoder cosine with its mean, and the matched pairs whose cosine is
        at least ``threshold`` (query, in [-1, 1], default 0.5), best first, ``offset``/``limit`` paged."""
        query = request.query_params
        threshold = _number(query, "threshold", 0.5, float, -1.0, 1.0)
        offset = _number(query, "offset", 0, int, 0, 1 << 30)
        limit = _number(query, "limit", 50, int, 1, 1000)
        _, handle = self._handle(query.get("model"))
        return _unwrap(await handle.compare.remote(a, b, threshold, offset, limit))


def _number(query, name: str, default, kind, low, high):
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, f"{name}: {raw!r} is not a{'n integer' if kind is int else ' number'}", param=name) from None
    if not low <= value <= high:  # also refuses NaN
        raise ApiError(400, f"{name}: {value} is out of range [{low}, {high}]", param=name)
    return value


def _texts(side) -> dict:
    return {"texts": len(side.texts)} if side.texts is not None else {}


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)
