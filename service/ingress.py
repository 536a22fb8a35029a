"""The ingress deployment: the HTTP API (``/v1/...``, ``/healthz``, ``/metrics``) and access
control; it holds a ``DeploymentHandle`` to each model deployment.

    client ─HTTP─► Ingress ─DeploymentHandle─► ModelDeployment (one a model)

The routes live in :mod:`service.routes` by concern (generation, dictionaries, jobs, steering, presets, the page) as
mixins, each declared with :func:`service.routes.table.route` (its role and statuses, once);
upload parsing is :mod:`service.uploads`, job launching :mod:`service.launcher`.
:class:`HttpApi` composes them and provides what they share (the access check, body reading
counted as it arrives, the model handles), and ``Ingress`` is that class as a Serve
deployment. It receives API keys as digests only, and refuses to start without keys when
Serve listens on anything but loopback.

``HttpApi`` stays importable under its own name (the deployment is a separate name) so that
Serve pickles it by reference: the replica imports this module, so every route method and
module-level object (``METRICS``) is the replica's own, not a copy pickled with the class.
"""

import json

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError
from ray import serve

from service.access import AccessControl, require_keys_off_loopback
from service.feature_search import FeatureIndexes
from service.http import METRICS, _unwrap, app
from service.jobs import DEFAULT_CORPORA, JobStore
from service.metrics import exposition
from service.model_server import Limits
from service.protocol import ApiError, validation_param
from service.routes.dictionaries import DictionaryRoutes
from service.routes.generation import GenerationRoutes
from service.routes.jobs import JobRoutes
from service.routes.presets import PresetRoutes
from service.routes.steering import SteeringRoutes
from service.routes.table import route
from service.ui import PageRoutes


class HttpApi(GenerationRoutes, DictionaryRoutes, JobRoutes, SteeringRoutes, PageRoutes, PresetRoutes):
    def __init__(self, models: dict, limits: dict, api_keys: list[dict] | None = None,
                 registry_name: str | None = None, corpora: dict | None = None):
        """``api_keys``: digests (:func:`service.access.resolve_keys`, run where the app is built)."""
        import uuid

        from dictionaries.store import DictionaryStore
        from service.app import _safe, serve_http_host
        from service.registry import registry_name as own_registry

        self.access = AccessControl(api_keys or [])
        require_keys_off_loopback(serve_http_host(), list(self.access.keys))  # however the app was started
        self.models = models  # name -> DeploymentHandle
        self.default_model = next(iter(models))
        self.deployment_names = {name: f"model-{_safe(name)}" for name in models}
        self.limits = Limits(**limits)
        self.app_name = serve.get_replica_context().app_name
        self.registry_name = own_registry(registry_name)
        self.corpora = dict(DEFAULT_CORPORA if corpora is None else corpora)
        self.launcher_id = uuid.uuid4().hex[:12]  # this replica, as the launcher of the jobs it watches
        self.jobs = JobStore()
        self.jobs.mark_interrupted()  # what a previous run left running cannot be finished now
        self.tasks: dict = {}  # job id -> Ray ObjectRef of its task
        self.feature_indexes = FeatureIndexes()  # feature search, one index a dictionary (service/ui.py)
        DictionaryStore().cleanup()  # what crashed or lost uploads left behind (younger staging is kept)

    def _allow(self, request: Request, role: str = "user"):
        """The caller's key (None on an open service), or 401/403/429 (used by ``@route``)."""
        return self.access.authorize(request.headers.get("authorization"), role)

    # --- helpers ------------------------------------------------------------------------------------

    async def _read_body(self, request: Request, limit: int) -> bytes:
        """The body, counted as it arrives: a body without (or lying about) ``Content-Length``
        is cut off at ``limit`` like any other (413)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body is {length} bytes; the limit is {limit}", type="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over {limit} bytes", type="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request, model_type):
        raw = await self._read_body(request, self.limits.max_body_bytes)
        try:
            data = json.loads(raw)  # NaN and Infinity parse here and are refused, by field, below
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            return model_type.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = validation_param(tuple(first["loc"]))
            raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None

    def _handle(self, model: str | None):
        name = model or self.default_model
        if name not in self.models:
            raise ApiError(404, f"model {name[:64]!r} is not served (served: {', '.join(self.models)})",
                           type="not_found_error", param="model")
        return name, self.models[name]

    # --- endpoints ------------------------------------------------------------------------------------

    @route("GET", "/healthz", role="public", errors=(503,))
    async def healthz(self) -> dict:
        for name, handle in self.models.items():
            _unwrap(await handle.describe.remote())
        return {"status": "ok", "models": list(self.models)}

    @route("GET", "/metrics", role="admin", errors=(503,), media="text/plain")
    async def metrics(self, request: Request):
        """Prometheus text: this ingress's counters and every live model replica's (each labelled
        ``replica``), as the replicas last reported them to the registry."""
        from service.registry import registry

        await self._count_jobs()
        replicas = await registry(self.registry_name).metrics.remote()
        return PlainTextResponse(exposition(METRICS.text(), replicas), media_type="text/plain; version=0.0.4")

    @route("GET", "/v1/models", role="user", errors=(503,))
    async def list_models(self, request: Request) -> dict:
        """The served models, then every steering preset as ``BASE+PRESET`` (usable as a model)."""
        cards = [_unwrap(await handle.describe.remote()) for handle in self.models.values()]
        return {"object": "list", "data": cards + self._preset_cards()}


Ingress = serve.deployment(name="Ingress", max_ongoing_requests=256)(serve.ingress(app)(HttpApi))
