"""Dictionary routes: list, describe, feature pages; upload and hot deployment (admin).

A deploy serves exactly the stored version (the weights' SHA-256) on every running replica of
the model: it reloads a name whose weights changed, waits for each replica Serve lists as
running to acknowledge, and reports the version each one serves.
"""

import asyncio
import json
import shutil
import time

from fastapi import Request

from service.http import _unwrap
from service.protocol import ApiError, dictionary_name
from service.ui import stored_dictionaries
from service.routes.table import route

DEPLOY_WAIT_S = 120.0
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["config.json", "sae.safetensors"], "additionalProperties": False,
    "properties": {"config.json": {"type": "string", "format": "binary", "description": "steerserve.dictionary/1"},
                   "sae.safetensors": {"type": "string", "format": "binary"},
                   "metrics.json": {"type": "string", "format": "binary", "description": "a JSON object"}}}}}}
DEPLOY_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False,
    "properties": {"model": {"type": ["string", "null"], "description": "Served model; default: the first one."}}}}}}


class DictionaryRoutes:
    @route("GET", "/v1/dictionaries", role="user", errors=(503,))
    async def list_dictionaries(self, request: Request) -> dict:
        entries = []
        for handle in self.models.values():
            entries += [entry | {"deployed": True} for entry in _unwrap(await handle.dictionaries.remote())]
        if request.query_params.get("stored") in ("true", "1"):  # also what is in the store, not deployed
            entries += await asyncio.to_thread(stored_dictionaries, entries)
        return {"object": "list", "data": entries}

    @route("GET", "/v1/dictionaries/{name}", role="user", errors=(404, 503))
    async def get_dictionary(self, name: str, request: Request) -> dict:
        return await self._first_with(name, lambda handle: handle.dictionary.remote(name))

    @route("GET", "/v1/dictionaries/{name}/features/{index}", role="user", errors=(400, 404, 503))
    async def get_feature(self, name: str, index: int, request: Request) -> dict:
        return await self._first_with(name, lambda handle: handle.feature.remote(name, index))

    @route("PUT", "/v1/dictionaries/{name}", role="admin", errors=(400, 413, 507), request_body=UPLOAD_BODY)
    async def upload_dictionary(self, name: str, request: Request) -> dict:
        """Install a native dictionary (multipart parts ``config.json`` and ``sae.safetensors``,
        optionally ``metrics.json``) into the store, fully validated and atomically. A bad upload
        changes nothing: the dictionary already under that name keeps serving."""
        from dictionaries.config import DictionaryError
        from dictionaries.store import DictionaryStore
        from service.uploads import receive_parts

        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_upload_bytes:
            raise ApiError(413, f"upload is {length} bytes; the limit is {self.limits.max_upload_bytes}",
                           type="request_too_large")
        dictionary_name(name)
        store = DictionaryStore()
        staging = await asyncio.to_thread(store.staging_dir, f"upload-{name}")
        try:
            await receive_parts(request, staging, self.limits.max_upload_bytes)
            await asyncio.to_thread(store.put, name, staging)
            info = await asyncio.to_thread(store.info, name)
            version = await asyncio.to_thread(store.version, name)
        except DictionaryError as err:
            raise ApiError(400, f"dictionary refused: {err}", param="sae.safetensors" if "safetensors" in str(err)
                           else "metrics.json" if "metrics.json" in str(err) else "config.json") from None
        except OSError as err:  # the disk failed or is full: nothing was installed
            raise ApiError(507, f"the upload could not be stored ({type(err).__name__}: {err.strerror or 'I/O error'}); "
                                "nothing changed", type="server_error") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        return {"name": name, "installed": True, "sha256": version, "config": info["config"],
                "note": "installed in the store; POST /v1/dictionaries/{name}/deploy serves it"}

    @route("POST", "/v1/dictionaries/{name}/deploy", role="admin", errors=(400, 404, 409, 503), request_body=DEPLOY_BODY)
    async def deploy_dictionary(self, name: str, request: Request) -> dict:
        """Serve the stored version of a dictionary on every replica of its model, without a restart."""
        return await self._set_deployed(name, request, True)

    @route("DELETE", "/v1/dictionaries/{name}/deploy", role="admin", errors=(400, 404, 503), request_body=DEPLOY_BODY)
    async def undeploy_dictionary(self, name: str, request: Request) -> dict:
        """Unload a dictionary from every replica; requests naming it afterwards get a 4xx."""
        return await self._set_deployed(name, request, False)

    async def _set_deployed(self, name: str, request: Request, deployed: bool) -> dict:
        raw = await self._read_body(request, self.limits.max_body_bytes)
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object (or empty)")
        unknown = sorted(set(body) - {"model"})
        if unknown:
            raise ApiError(400, f"{unknown[0][:64]}: unexpected field; the only field is 'model'", param=unknown[0][:64])
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model: must be a string", param="model")
        return await self._deploy(name, model, deployed)

    async def _deploy(self, name: str, model: str | None, deployed: bool) -> dict:
        from dictionaries.format import WEIGHTS_FILE, file_sha256
        from dictionaries.store import DictionaryStore
        from service.registry import registry, running_replicas

        dictionary_name(name)
        model_name, handle = self._handle(model)
        store, sha256, path = DictionaryStore(), None, None
        if deployed:
            if name not in store:
                raise ApiError(404, f"no dictionary named {name!r} in the store", type="not_found_error", param="name")
            check = await handle.check_dictionary.remote(name)
            if check["errors"]:
                raise ApiError(400, f"dictionary {name!r} cannot be served by {model_name!r}: "
                                    + "; ".join(check["errors"]), param="name")
            path = await asyncio.to_thread(store.path, name)  # this object directory is the version deployed
            sha256 = await asyncio.to_thread(file_sha256, path / WEIGHTS_FILE)
        actor = registry(self.registry_name)
        before = (await actor.state.remote(model_name))["names"].get(name)
        version = await actor.change.remote(model_name, name, sha256)
        deployment = self.deployment_names[model_name]
        deadline = time.time() + DEPLOY_WAIT_S
        while True:
            replicas = await asyncio.to_thread(running_replicas, deployment, self.app_name)
            progress = await actor.progress.remote(model_name, version, replicas)
            if replicas and not progress["waiting"]:
                break
            if time.time() > deadline:
                raise ApiError(503, f"not every replica of {model_name!r} confirmed within {DEPLOY_WAIT_S:.0f} s "
                                    f"({progress['acknowledged']}/{progress['replicas']})", type="server_error")
            await asyncio.sleep(0.1)
        self.feature_indexes.drop(name)  # the replicas reloaded it: search rebuilds from the store
        await actor.forget.remote(model_name, replicas)
        failures = {replica: errors[name] for replica, errors in progress["errors"].items() if name in errors}
        if deployed and failures:
            await actor.change.remote(model_name, name, before)  # roll back; nothing else changes
            message = next(iter(failures.values()))
            raise ApiError(409 if "replaced meanwhile" in message else 400,
                           f"dictionary {name!r} failed to load: {message}", param="name")
        # the store keeps the served version while it is served (a restarting replica loads it)
        if deployed:
            await asyncio.to_thread(store.pin, self.registry_name, model_name, name, path)
        else:
            await asyncio.to_thread(store.unpin, self.registry_name, model_name, name)
        return {"dictionary": name, "model": model_name, "deployed": deployed, "sha256": sha256,
                "replicas": progress["replicas"], "version": version,
                "served": {replica: served.get(name) for replica, served in progress["served"].items()}}

    async def _first_with(self, name: str, call):
        last = None
        for handle in self.models.values():
            result = await call(handle)
            if "ok" in result:
                return result["ok"]
            last = result
            if result["error"]["error"]["param"] != "name":  # the dictionary is here; the error is about the call
                break
        return _unwrap(last)
