"""The FastAPI app the ingress serves: error envelopes, the OpenAPI schema with the request
models, and per-route request counting for ``/metrics``."""

import functools
import time
import types

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import get_route_path

from service.metrics import IngressMetrics
from service.protocol import (
    ApiError,
    CompletionRequest,
    ContrastRequest,
    EvaluationJobRequest,
    GenerateRequest,
    ErrorEnvelope,
    InspectRequest,
    PresetRequest,
    SearchRequest,
    TrainingJobRequest,
    VectorUpload,
    error_body,
    validation_param,
)

app = FastAPI(title="steerserve", version="0.1.0",
              description="Steered generation through sparse-autoencoder dictionary features, per request.")


def _request_body(model) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(served: FastAPI) -> dict:
    """FastAPI's schema, plus the request models (the routes read their bodies themselves,
    to answer every mistake with the error envelope). Built on each call: Serve re-mounts the
    ingress's routes after import, so a schema cached early would miss them."""
    served.openapi_schema = None
    schema = FastAPI.openapi(served)  # FastAPI's own walk of the (re-mounted) routes
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (GenerateRequest, CompletionRequest, InspectRequest, EvaluationJobRequest, TrainingJobRequest,
                  PresetRequest, SearchRequest, ContrastRequest, VectorUpload):
        full = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(full.pop("$defs", {}))
        components[model.__name__] = full
    for operations in schema.get("paths", {}).values():  # path parameters that fail are our 400, not FastAPI's 422
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components["ErrorEnvelope"] = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(components["ErrorEnvelope"].pop("$defs", {}))
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                          "description": "An API key: `Authorization: Bearer KEY`"}}
    return schema


app.openapi = types.MethodType(_openapi, app)  # bound: the app that serves, wherever it was unpickled
METRICS = IngressMetrics()  # this process's (the ingress replica's) counters


def counted(method: str, endpoint: str):
    """Count an endpoint's requests by status and time them (routes are counted one by one:
    app-level middleware does not run under Serve's class-based ingress)."""
    def wrap(fn):
        @functools.wraps(fn)
        async def inner(*args, **kwargs):
            started, status = time.perf_counter(), 200
            try:
                return await fn(*args, **kwargs)
            except ApiError as err:
                status = err.status
                raise
            except Exception as err:
                status = 503 if replica_gone(err) else 500
                raise
            finally:
                METRICS.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
                METRICS.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        return inner
    return wrap


@app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(RequestValidationError)
async def _path_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    return JSONResponse(error_body("invalid_request_error", first.get("msg", "invalid request"),
                                   validation_param(tuple(first.get("loc", ())))), status_code=400)


@app.exception_handler(HTTPException)
async def _framework_error(request: Request, err: HTTPException) -> JSONResponse:
    """The router's own answers (no such route, a method the path does not take) in the envelope;
    a 405's ``Allow`` lists every method any route on that path takes."""
    headers = dict(err.headers or {})
    if err.status_code == 405:
        from service.routes.table import allowed_methods  # the route table imports this module

        methods = allowed_methods(get_route_path(request.scope)) or set(headers.get("Allow", "").split(", ")) - {""}
        headers["Allow"] = ", ".join(sorted(methods))
        message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
    elif err.status_code == 404:
        message = "no such route"
    else:
        message = str(err.detail)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(kind, message), status_code=err.status_code, headers=headers)


def replica_gone(err: BaseException) -> bool:
    """Whether ``err`` says the model replica behind a handle died or is unreachable."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, (ActorDiedError, ActorUnavailableError, RayActorError))


@app.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    if replica_gone(err):
        return JSONResponse(error_body("overloaded_error", "the model replica serving this request went away (it is "
                                       "restarting); the request was not completed: retry shortly"),
                            status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(error_body("server_error", f"internal error ({type(err).__name__}); the request was not completed"),
                        status_code=500)


def _unwrap(result: dict):
    if "error" in result:
        raise ApiError.from_data(result)
    return result["ok"]
