"""Which dictionaries, at which version, each served model should have loaded, shared by every
replica.

A small named Ray actor (one an application: ``registry-<app name>``, so building the app
again reuses it instead of leaving another behind) holds, for each model, the desired
dictionaries as ``{name: weights sha256}`` and a version number. Every model replica follows
it from a background thread: when the version changes it drops, loads or *reloads* (when the
stored weights changed) dictionaries between scheduler steps, then acknowledges the version
with the versions it now serves and any errors. ``POST /v1/dictionaries/{name}/deploy`` sets
the desired weights and waits until every running replica of the model (as Serve lists them,
not only those that spoke lately) has acknowledged — so a deploy serves exactly the stored
version on every replica, and rows already running finish with the weights they started
with. Each heartbeat also carries the replica's metrics text, which ``GET /metrics`` merges.

Each build of the app has a token: the first replica of a new build resets the desired state
to what its configuration loaded; replicas of the same build that restart find the state
(with any hot deployments) as it was, and load exactly those versions — the store keeps each
deployed version (pinned) until it is no longer served, whatever was uploaded since.
"""

from __future__ import annotations

import time

import ray

HEARTBEAT_S = 0.25
ALIVE_S = 5.0


@ray.remote(num_cpus=0)
class Registry:
    def __init__(self):
        self.desired: dict[str, dict] = {}  # model -> {"version", "names": {name: sha256}, "token"}
        self.acks: dict[tuple[str, str], dict] = {}  # (model, replica) -> {"version", "served", "errors", "seen"}

    def initialise(self, model: str, loaded: dict[str, str], token: str) -> dict:
        """The model's state; a new build (token) starts from what its replica loaded."""
        state = self.desired.get(model)
        if state is None or state["token"] != token:
            version = (state["version"] + 1) if state else 1
            self.desired[model] = state = {"version": version, "names": dict(loaded), "token": token}
            return {**state, "reset": True}  # the caller starts this build: it pins what it loaded
        return state

    def state(self, model: str) -> dict:
        return self.desired.get(model, {"version": 0, "names": {}, "token": None})

    def change(self, model: str, name: str, sha256: str | None) -> int:
        """Desire ``name`` at ``sha256`` (None: not at all); the new version number."""
        state = self.desired.setdefault(model, {"version": 0, "names": {}, "token": None})
        names = dict(state["names"])
        if sha256 is None:
            names.pop(name, None)
        else:
            names[name] = sha256
        state["names"], state["version"] = names, state["version"] + 1
        return state["version"]

    def ack(self, model: str, replica: str, version: int, served: dict, errors: dict, metrics: str = "") -> None:
        self.acks[(model, replica)] = {"version": version, "served": served, "errors": errors, "seen": time.time(),
                                       "metrics": metrics}

    def metrics(self) -> dict[str, str]:
        """The latest metrics text of every live replica, by replica id."""
        now = time.time()
        return {replica: ack["metrics"] for (_, replica), ack in self.acks.items() if now - ack["seen"] < ALIVE_S}

    def progress(self, model: str, version: int, replicas: list[str]) -> dict:
        """How far ``replicas`` (the running ones, by id) are with ``version``."""
        acks = {r: a for (m, r), a in self.acks.items() if m == model and r in replicas}
        done = {r: a for r, a in acks.items() if a["version"] >= version}
        return {"replicas": len(replicas), "acknowledged": len(done),
                "waiting": sorted(set(replicas) - set(done)),
                "errors": {r: a["errors"] for r, a in done.items() if a["errors"]},
                "served": {r: a["served"] for r, a in done.items()}}

    def forget(self, model: str, keep: list[str]) -> None:
        """Drop the acknowledgements of replicas that are gone."""
        for key in [k for k in self.acks if k[0] == model and k[1] not in keep]:
            del self.acks[key]


def registry(name: str):
    """The registry actor of one application (created on first use, detached: it outlives any one
    replica; ``service.app.delete_app`` removes it with the app)."""
    return Registry.options(name=name, namespace="steerserve", get_if_exists=True, lifetime="detached").remote()


def registry_name(configured: str | None = None) -> str:
    """``configured``, or this application's own: ``registry-<app name>`` (inside a replica)."""
    if configured:
        return configured
    from ray import serve

    return f"registry-{serve.get_replica_context().app_name}"


def running_replicas(deployment_prefix: str, app_name: str) -> list[str]:
    """The ids of the RUNNING replicas of a deployment of ``app_name`` (as Serve's controller says)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(app_name) or {}
    replicas = []
    for name, deployment in (app.get("deployments") or {}).items():
        if name == deployment_prefix:
            replicas += [r["replica_id"] for r in deployment.get("replicas", []) if r.get("state") == "RUNNING"]
    return replicas
