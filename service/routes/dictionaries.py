"""Dictionary routes: list, describe, feature pages; upload and hot deployment (admin)."""

import asyncio
import json
import time

from fastapi import Request

from service.http import app, counted, _unwrap
from service.protocol import ApiError
from service.ui import stored_dictionaries


class DictionaryRoutes:
    @app.get("/v1/dictionaries")
    @counted("GET", "/v1/dictionaries")
    async def list_dictionaries(self, request: Request) -> dict:
        self._allow(request)
        entries = []
        for handle in self.models.values():
            entries += [entry | {"deployed": True} for entry in _unwrap(await handle.dictionaries.remote())]
        if request.query_params.get("stored") in ("true", "1"):  # also what is in the store, not deployed
            entries += await asyncio.to_thread(stored_dictionaries, entries)
        return {"object": "list", "data": entries}

    @app.get("/v1/dictionaries/{name}")
    @counted("GET", "/v1/dictionaries/{name}")
    async def get_dictionary(self, name: str, request: Request) -> dict:
        self._allow(request)
        return await self._first_with(name, lambda handle: handle.dictionary.remote(name))

    @app.get("/v1/dictionaries/{name}/features/{index}")
    @counted("GET", "/v1/dictionaries/{name}/features/{index}")
    async def get_feature(self, name: str, index: int, request: Request) -> dict:
        self._allow(request)
        return await self._first_with(name, lambda handle: handle.feature.remote(name, index))

    @app.put("/v1/dictionaries/{name}")
    @counted("PUT", "/v1/dictionaries/{name}")
    async def upload_dictionary(self, name: str, request: Request) -> dict:
        """Install a native dictionary (multipart parts ``config.json`` and ``sae.safetensors``,
        optionally ``metrics.json``) into the store, fully validated and atomically. A bad upload
        changes nothing: the dictionary already under that name keeps serving."""
        import tempfile
        from pathlib import Path

        from dictionaries.config import DictionaryError
        from dictionaries.store import DictionaryStore, validate_name

        self._allow(request, "admin")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_upload_bytes:
            raise ApiError(413, f"upload is {length} bytes; the limit is {self.limits.max_upload_bytes}",
                           type="request_too_large")
        try:
            validate_name(name)
        except DictionaryError as err:
            raise ApiError(400, str(err), param="name") from None
        try:
            form = await request.form()
        except Exception as err:
            raise ApiError(400, f"expected a multipart form with the parts config.json and sae.safetensors ({err})") from None
        parts = {key: value for key, value in form.multi_items() if hasattr(value, "read")}
        for required in ("config.json", "sae.safetensors"):
            if required not in parts:
                raise ApiError(400, f"the multipart form has no part named {required!r}", param=required)
        unknown = sorted(set(parts) - {"config.json", "sae.safetensors", "metrics.json"})
        if unknown:
            raise ApiError(400, f"unexpected part(s) {', '.join(unknown)}", param=unknown[0])
        with tempfile.TemporaryDirectory() as staging:
            for filename, upload in parts.items():
                Path(staging, filename).write_bytes(await upload.read())
            try:
                await asyncio.to_thread(DictionaryStore().put, name, staging)
            except DictionaryError as err:
                raise ApiError(400, f"dictionary refused: {err}", param="sae.safetensors" if "safetensors" in str(err)
                               else "config.json") from None
        info = DictionaryStore().info(name)
        return {"name": name, "installed": True, "config": info["config"],
                "note": "installed in the store; POST /v1/dictionaries/{name}/deploy serves it"}

    @app.post("/v1/dictionaries/{name}/deploy")
    @counted("POST", "/v1/dictionaries/{name}/deploy")
    async def deploy_dictionary(self, name: str, request: Request) -> dict:
        """Load a stored dictionary into every replica of its model, without a restart."""
        return await self._set_deployed(name, request, True)

    @app.delete("/v1/dictionaries/{name}/deploy")
    @counted("DELETE", "/v1/dictionaries/{name}/deploy")
    async def undeploy_dictionary(self, name: str, request: Request) -> dict:
        """Unload a dictionary from every replica; requests naming it afterwards get a 4xx."""
        return await self._set_deployed(name, request, False)

    async def _set_deployed(self, name: str, request: Request, deployed: bool) -> dict:
        self._allow(request, "admin")
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from None
        return await self._deploy(name, body.get("model") if isinstance(body, dict) else None, deployed)

    async def _deploy(self, name: str, model: str | None, deployed: bool) -> dict:
        from dictionaries.store import DictionaryStore

        model_name, handle = self._handle(model)
        if not self.registry_name:
            raise ApiError(503, "this app was built without a registry; hot deployment is off", type="server_error")
        if deployed:
            if name not in DictionaryStore():
                raise ApiError(404, f"no dictionary named {name!r} in the store", type="not_found_error", param="name")
            check = await handle.check_dictionary.remote(name)
            if check["errors"]:
                raise ApiError(400, f"dictionary {name!r} cannot be served by {model_name!r}: "
                                    + "; ".join(check["errors"]), param="name")
        from service.registry import registry

        actor = registry(self.registry_name)
        version = await actor.change.remote(model_name, name, deployed)
        deadline = time.time() + 120
        while True:
            progress = await actor.progress.remote(model_name, version)
            if progress["replicas"] and progress["acknowledged"] >= progress["replicas"]:
                break
            if time.time() > deadline:
                raise ApiError(503, f"not every replica of {model_name!r} confirmed within 120 s "
                                    f"({progress['acknowledged']}/{progress['replicas']})", type="server_error")
            await asyncio.sleep(0.1)
        self.feature_indexes.drop(name)  # the replicas reloaded it: search rebuilds from the store
        failures = {replica: errors[name] for replica, errors in progress["errors"].items() if name in errors}
        if deployed and failures:
            await actor.change.remote(model_name, name, False)  # roll back; nothing else changes
            raise ApiError(400, f"dictionary {name!r} failed to load: {next(iter(failures.values()))}", param="name")
        return {"dictionary": name, "model": model_name, "deployed": deployed, "replicas": progress["replicas"],
                "version": version}

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
