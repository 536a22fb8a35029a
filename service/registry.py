"""Which dictionaries each served model should have loaded, shared by every replica.

A small named Ray actor holds, for each model, the desired set of dictionaries and a
version number. Every model replica follows it from a background thread: when the version
changes it loads (from the store) or drops dictionaries between batches, then acknowledges
the version with any errors. ``POST /v1/dictionaries/{name}/deploy`` changes the desired
set and waits until every live replica of that model has acknowledged — so a deploy
reaches all replicas without a restart, and rows already running finish with the weights
they started with. Each heartbeat also carries the replica's metrics text, which
``GET /metrics`` merges across replicas.
"""

from __future__ import annotations

import time

import ray

HEARTBEAT_S = 0.25
ALIVE_S = 5.0


@ray.remote(num_cpus=0)
class Registry:
    def __init__(self):
        self.desired: dict[str, dict] = {}  # model -> {"version": int, "names": list[str]}
        self.acks: dict[tuple[str, str], dict] = {}  # (model, replica) -> {"version", "errors", "seen"}

    def initialise(self, model: str, names: list[str]) -> dict:
        """The model's state, created from its configured dictionaries the first time."""
        if model not in self.desired:
            self.desired[model] = {"version": 1, "names": sorted(names)}
        return self.desired[model]

    def state(self, model: str) -> dict:
        return self.desired.get(model, {"version": 0, "names": []})

    def change(self, model: str, name: str, deployed: bool) -> int:
        state = self.desired.setdefault(model, {"version": 0, "names": []})
        names = set(state["names"])
        names.add(name) if deployed else names.discard(name)
        state["names"], state["version"] = sorted(names), state["version"] + 1
        return state["version"]

    def ack(self, model: str, replica: str, version: int, errors: dict, metrics: str = "") -> None:
        self.acks[(model, replica)] = {"version": version, "errors": errors, "seen": time.time(), "metrics": metrics}

    def metrics(self) -> dict[str, str]:
        """The latest metrics text of every live replica, by replica id."""
        now = time.time()
        return {replica: ack["metrics"] for (_, replica), ack in self.acks.items() if now - ack["seen"] < ALIVE_S}

    def progress(self, model: str, version: int) -> dict:
        now = time.time()
        alive = {r: a for (m, r), a in self.acks.items() if m == model and now - a["seen"] < ALIVE_S}
        done = {r: a for r, a in alive.items() if a["version"] >= version}
        errors = {r: a["errors"] for r, a in done.items() if a["errors"]}
        return {"replicas": len(alive), "acknowledged": len(done), "errors": errors}


def registry(name: str):
    """The registry actor of one application (created on first use, detached)."""
    return Registry.options(name=name, namespace="steerserve", get_if_exists=True, lifetime="detached").remote()
