"""The application builder, and starting it locally.

    serve run deploy/local.yaml            # Ray Serve reads the same builder from YAML
    steerserve serve [--config FILE] [--port N]

``build_app(args)`` takes the app's arguments (typed by :class:`AppArgs`): the models to
serve, each with its dictionaries, device and dtype, and the limits; it returns the bound
application (the ingress and one model deployment a model).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydantic import BaseModel, Field

from service.jobs import DEFAULT_CORPORA
from service.model_server import Limits, ModelConfig, environment_for_workers


class ModelArgs(BaseModel):
    name: str = "pythia-tiny"
    dictionaries: list[str] = Field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int | None = None
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


class AppArgs(BaseModel):
    models: list[ModelArgs] = Field(default_factory=lambda: [ModelArgs()])
    api_keys: list[dict] | None = Field(default=None, description="[{key, role, name, rate_per_minute}]; "
                                        "None: from STEERSERVE_API_KEYS(_FILE); none at all: open (loopback only)")
    registry: str | None = Field(default=None, description="Name of the hot-deployment registry actor; "
                                 "default: registry-<application name>")
    corpora: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CORPORA), description=(
        "The corpora evaluation jobs may name: {name: source}, the source a 'builtin:' corpus or a file or "
        "directory on the server (admin-registered; callers see names only)"))
    limits: Limits = Field(default_factory=Limits)  # the dataclass itself: pydantic validates its fields


def build_app(args: dict | AppArgs):
    """The Ray Serve application for ``args``."""
    from service.ingress import Ingress
    from service.model_deployment import ModelDeployment

    from service.access import require_keys_off_loopback, resolve_keys

    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    limits = args.limits
    keys = resolve_keys(args.api_keys)  # digests only from here on
    require_keys_off_loopback(serve_http_host(), keys)
    build = uuid.uuid4().hex[:12]  # this build: its replicas share the registry's state, a new build resets it
    handles = {}
    for model in args.models:
        config = ModelConfig(name=model.name, dictionaries=tuple(model.dictionaries), device=model.device,
                             dtype=model.dtype, torch_threads=model.torch_threads or max(1, int(model.num_cpus)))
        env = environment_for_workers()
        if model.device == "cpu":
            # torch's OpenMP threads spin while they wait; beside Ray's proxy and ingress on the same
            # cores that makes a step many times slower. Passive waiting costs little when alone.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        deployment = ModelDeployment.options(
            name=f"model-{_safe(model.name)}", num_replicas=model.replicas,
            # every running and queued request is one ongoing call, plus room for descriptions and
            # inspect; the scheduler, not Serve, decides what waits (and answers 503 past its queue)
            max_ongoing_requests=limits.max_running_rows + limits.max_queued_requests + 32,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus, "runtime_env": {"env_vars": env}},
        )
        handles[model.name] = deployment.bind(config.__dict__, limits.__dict__, args.registry, build)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": environment_for_workers()}})
    return ingress.bind(handles, limits.__dict__, keys, args.registry, args.corpora)


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies listen on, when Serve is running (None otherwise)."""
    try:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        if not ray.is_initialized():
            return None
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except ValueError:  # no controller: Serve is not started yet
        return None


def delete_app(name: str) -> None:
    """Delete a running application, its registry actor and its pins in the store."""
    import ray
    from ray import serve

    from dictionaries.store import DictionaryStore

    serve.delete(name)
    try:
        ray.kill(ray.get_actor(f"registry-{name}", namespace="steerserve"))
    except ValueError:
        pass
    DictionaryStore().unpin_app(f"registry-{name}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[-48:]


def start_ray(temp_dir: Path | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) a local Ray, quietly and on loopback."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    temp_dir = Path(temp_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "steerserve-ray")
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(temp_dir),
             runtime_env={"env_vars": environment_for_workers()}, log_to_driver=False)


def run(args: AppArgs, *, host: str = "127.0.0.1", port: int = 8000, name: str = "steerserve",
        temp_dir: Path | None = None) -> str:
    """Start Ray and the app on ``host:port``; return the base URL."""
    from ray import serve

    from service.access import require_keys_off_loopback, resolve_keys

    require_keys_off_loopback(host, resolve_keys(args.api_keys))  # before anything listens
    start_ray(temp_dir)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
