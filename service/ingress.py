"""The ingress deployment: the HTTP API (``/v1/...``, ``/healthz``, ``/metrics``) and access
control; it holds a ``DeploymentHandle`` to each model deployment.

    client ─HTTP─► Ingress ─DeploymentHandle─► ModelDeployment (one a model)

The routes live in :mod:`service.routes` by concern (generation, dictionaries, jobs, steering) as
mixins; :class:`HttpApi` composes them and provides what they share (access checks, body
parsing, the model handles), and ``Ingress`` is that class as a Serve deployment.

``HttpApi`` stays importable under its own name (the deployment is a separate name) so that
Serve pickles it by reference: the replica imports this module, so every route method and
module-level object (``METRICS``) is the replica's own, not a copy pickled with the class.
"""

import json

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError
from ray import serve

from service.access import AccessControl, keys_from_environment
from service.http import METRICS, _unwrap, app, counted
from service.jobs import JobStore
from service.metrics import exposition
from service.model_server import Limits
from service.protocol import ApiError, validation_param
from service.routes.dictionaries import DictionaryRoutes
from service.routes.generation import GenerationRoutes
from service.routes.jobs import JobRoutes
from service.routes.steering import SteeringRoutes


class HttpApi(GenerationRoutes, DictionaryRoutes, JobRoutes, SteeringRoutes):
    def __init__(self, models: dict, limits: dict, api_keys: list[dict] | None = None,
                 registry_name: str | None = None):
        self.models = models  # name -> DeploymentHandle
        self.default_model = next(iter(models))
        self.limits = Limits(**limits)
        self.registry_name = registry_name
        self.access = AccessControl(api_keys if api_keys is not None else keys_from_environment())
        self.jobs = JobStore()
        self.jobs.mark_interrupted()  # what a previous run left running cannot be finished now
        self.tasks: dict = {}  # job id -> Ray ObjectRef of its task

    def _allow(self, request: Request, role: str = "user") -> None:
        self.access.authorize(request.headers.get("authorization"), role)
    # --- helpers ------------------------------------------------------------------------------------

    async def _body(self, request: Request, model_type):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body is {length} bytes; the limit is {self.limits.max_body_bytes}",
                           type="request_too_large")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body is over {self.limits.max_body_bytes} bytes", type="request_too_large")
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
            raise ApiError(404, f"model {name!r} is not served (served: {', '.join(self.models)})",
                           type="not_found_error", param="model")
        return name, self.models[name]

    # --- endpoints ------------------------------------------------------------------------------------

    @app.get("/healthz")
    @counted("GET", "/healthz")
    async def healthz(self) -> dict:
        for name, handle in self.models.items():
            _unwrap(await handle.describe.remote())
        return {"status": "ok", "models": list(self.models)}

    @app.get("/metrics")
    @counted("GET", "/metrics")
    async def metrics(self, request: Request):
        """Prometheus text: this ingress's counters and every live model replica's (each labelled
        ``replica``), as the replicas last reported them to the registry."""
        self._allow(request, "admin")
        self._count_jobs()
        replicas = {}
        if self.registry_name:
            from service.registry import registry

            replicas = await registry(self.registry_name).metrics.remote()
        return PlainTextResponse(exposition(METRICS.text(), replicas), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    @counted("GET", "/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._allow(request)
        cards = [_unwrap(await handle.describe.remote()) for handle in self.models.values()]
        return {"object": "list", "data": cards}


Ingress = serve.deployment(name="Ingress", max_ongoing_requests=256)(serve.ingress(app)(HttpApi))
