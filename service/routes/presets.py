"""Steering preset routes: ``PUT|GET|DELETE /v1/presets/{name}``, ``GET /v1/presets``, and the
resolution of ``"model": "BASE+PRESET"`` that every steered route uses (:meth:`PresetRoutes._steer`).

A preset is checked when it is stored (its model is served, its dictionaries are deployed
there, its features exist, it has no more edits than a request may) and again at every use
through the model's own checks: a preset whose dictionary was undeployed since is answered
409 with ``param: "model"``.
"""

import asyncio

from fastapi import Request

from service.http import _unwrap
from service.presets import PresetStore, validate_preset_name
from service.protocol import ApiError, PresetRequest
from service.routes.table import route


class PresetRoutes:
    def _steer(self, model: str | None):
        """``model`` (a served model or ``BASE+PRESET``) → ``(name, base, handle, preset or None)``."""
        name = model or self.default_model
        if name in self.models:
            return name, name, self.models[name], None
        base, plus, preset_name = name.rpartition("+")
        if not plus or base not in self.models:
            self._handle(name)  # the plain 404 naming the served models
        try:
            validate_preset_name(preset_name)
        except ApiError:
            raise ApiError(404, f"model {name!r}: {preset_name!r} is not a preset name", type="not_found_error",
                           param="model") from None
        preset = PresetStore().get(preset_name)
        if preset is None:
            raise ApiError(404, f"model {name!r}: no preset named {preset_name!r} (GET /v1/presets lists them)",
                           type="not_found_error", param="model")
        if preset["model"] != base:
            raise ApiError(404, f"model {name!r}: preset {preset_name!r} is for model {preset['model']!r}",
                           type="not_found_error", param="model")
        return name, base, self.models[base], preset

    def _preset_cards(self) -> list[dict]:
        """``/v1/models`` entries of the presets whose model is served here."""
        return [{"id": f"{preset['model']}+{preset['name']}", "object": "model", "created": int(preset["created"]),
                 "owned_by": "steerserve", "parent": preset["model"], "preset": preset["name"],
                 "description": preset.get("description", ""), "edits": preset["edits"]}
                for preset in PresetStore().all() if preset["model"] in self.models]

    @route("PUT", "/v1/presets/{name}", role="admin", errors=(400, 404, 409, 503), body=PresetRequest)
    async def put_preset(self, name: str, request: Request) -> dict:
        """Store (or replace) a preset (admin). Its edits are checked against the dictionaries
        its model serves now."""
        body = await self._body(request, PresetRequest)
        validate_preset_name(name)
        model = body.model or self.default_model
        if model not in self.models:
            raise ApiError(404, f"model {model!r} is not served (served: {', '.join(self.models)})",
                           type="not_found_error", param="model")
        if name in self.models or f"{model}+{name}" in self.models:
            raise ApiError(409, f"preset name {name!r} collides with a served model's name", type="conflict_error",
                           param="name")
        if len(body.edits) > self.limits.max_edits:
            raise ApiError(400, f"{len(body.edits)} edits; a request may carry at most {self.limits.max_edits}",
                           param="edits")
        # the model's own checks, as every use of the preset will run them (a vector edit names no
        # dictionary; conditions, units and steering vectors are checked as well)
        _unwrap(await self.models[model].check_edits.remote(body.edits))
        record = {"model": model, "edits": [edit.model_dump(exclude_none=True) for edit in body.edits],
                  "description": body.description}
        stored = await asyncio.to_thread(PresetStore().put, name, record)
        return {**stored, "id": f"{model}+{name}"}

    @route("GET", "/v1/presets", role="user")
    async def list_presets(self, request: Request) -> dict:
        return {"object": "list", "data": [{**p, "id": f"{p['model']}+{p['name']}"} for p in PresetStore().all()]}

    @route("GET", "/v1/presets/{name}", role="user", errors=(400, 404))
    async def get_preset(self, name: str, request: Request) -> dict:
        preset = PresetStore().get(validate_preset_name(name))
        if preset is None:
            raise ApiError(404, f"no preset named {name!r}", type="not_found_error", param="name")
        return {**preset, "id": f"{preset['model']}+{preset['name']}"}

    @route("DELETE", "/v1/presets/{name}", role="admin", errors=(400, 404))
    async def delete_preset(self, name: str, request: Request) -> dict:
        if not await asyncio.to_thread(PresetStore().delete, validate_preset_name(name)):
            raise ApiError(404, f"no preset named {name!r}", type="not_found_error", param="name")
        return {"name": name, "deleted": True}
