"""The Python client for a steerserve server (``requests`` only; no torch).

    from clients.client import Client, Ablate, Scale, Set, Vector, When
    client = Client("http://127.0.0.1:8000")
    out = client.generate("Return the number of", max_new_tokens=16, include_baseline=True,
                          edits=[Ablate("pythia-tiny-l2", 312), Scale("pythia-tiny-l2", 77, 4.0)])
    out["text"], out["baseline"]["text"], out["edit_report"]
    for chunk in client.complete("def main(", max_tokens=16, stream=True): ...
    client.put_preset("formal", [Scale("pythia-tiny-l2", 77, 4.0)])   # admin; then "model": "pythia-tiny+formal"

    found = client.contrast(["Return the file.", ...], ["Return the value.", ...], "pythia-tiny-l2",
                            save_vector="file-vs-value")                      # saving needs an admin key
    client.generate("If the", edits=[Vector("file-vs-value", 4.0),
                                     Set("pythia-tiny-l2", 403, 2.0, unit="max_activation",
                                         when=When("pythia-tiny-l2", 680, above=1.0))])
    client.search("def open(path):", "pythia-tiny-l2", span=(9, 13))
    client.compare("l2-a", "l2-b", threshold=0.8)

Calls that are safe to repeat (GET, PUT, DELETE) are retried after a connection error; a
POST is not (a job could start twice). A 503 or 429 with ``Retry-After`` means the server
refused the request without doing anything, so every call retries those, after the time
it asks for. Any other error raises :class:`SteerserveError`, which carries the server's
error envelope; a stream that ends without ``[DONE]``, or with an error event, raises
:class:`StreamError` (output cut short never looks complete).
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import requests


class SteerserveError(Exception):
    """An error answer from the server: ``status``, ``type``, ``message``, ``param``."""

    def __init__(self, status: int, body: dict | None, text: str = ""):
        error = (body or {}).get("error") or {}
        self.status, self.body = status, body
        self.type = error.get("type", "http_error")
        self.message = error.get("message") or text or f"HTTP {status}"
        self.param = error.get("param")
        super().__init__(f"{status} {self.type}: {self.message}" + (f" (param: {self.param})" if self.param else ""))


class StreamError(SteerserveError):
    """A stream that ended abnormally: an error event, or no ``[DONE]``; ``received`` holds the
    events that did arrive."""

    def __init__(self, body: dict | None, text: str, received: list[dict]):
        super().__init__(0, body, text)
        self.received = received


IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
REFUSED = (429, 503)  # answered with Retry-After: nothing was done, the call may be repeated


def When(dictionary: str, feature: int, *, above: float | None = None, below: float | None = None) -> dict:  # noqa: N802
    """A condition for an edit's ``when``: the feature above (or below) a threshold at a token."""
    if (above is None) == (below is None):
        raise ValueError("give exactly one of above= and below=")
    return {"dictionary": dictionary, "feature": feature, **({"above": above} if above is not None else {"below": below})}


def _edit(body: dict, positions: str, unit: str = "raw", when: dict | None = None) -> dict:
    body["positions"] = positions
    if unit != "raw":
        body["value_unit"] = unit
    if when is not None:
        body["when"] = when
    return body


def Ablate(dictionary: str, feature: int, positions: str = "all", *, when: dict | None = None) -> dict:  # noqa: N802 - reads like a type
    return _edit({"dictionary": dictionary, "feature": feature, "op": "ablate"}, positions, when=when)


def Scale(dictionary: str, feature: int, value: float, positions: str = "all", *, when: dict | None = None) -> dict:  # noqa: N802
    return _edit({"dictionary": dictionary, "feature": feature, "op": "scale", "value": value}, positions, when=when)


def Set(dictionary: str, feature: int, value: float, positions: str = "all", *, unit: str = "raw",  # noqa: N802
        when: dict | None = None) -> dict:
    """``unit="max_activation"``: ``value`` in multiples of the feature's recorded maximum activation."""
    return _edit({"dictionary": dictionary, "feature": feature, "op": "set", "value": value}, positions, unit, when)


def Add(dictionary: str, feature: int, value: float, positions: str = "all", *, unit: str = "raw",  # noqa: N802
        when: dict | None = None) -> dict:
    return _edit({"dictionary": dictionary, "feature": feature, "op": "add", "value": value}, positions, unit, when)


def Vector(name: str, value: float, positions: str = "all", *, unit: str = "raw", when: dict | None = None) -> dict:  # noqa: N802
    """Add ``value`` times the stored steering vector ``name``; ``unit="residual_norm"``: ``value·‖h‖·v/‖v‖``."""
    return _edit({"op": "vector", "vector": name, "value": value}, positions, unit, when)


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # --- transport ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, *, stream: bool = False,
                 files: dict | None = None) -> requests.Response:
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                response = self.session.request(method, self.base_url + path, json=body, files=files,
                                                timeout=self.timeout, stream=stream)
            except requests.ConnectionError:
                if attempt == self.retries or method.upper() not in IDEMPOTENT:
                    raise
            else:
                refused = response.status_code in REFUSED and response.headers.get("Retry-After", "").isdigit()
                if not refused or attempt == self.retries:
                    if response.status_code >= 400:
                        try:
                            payload = response.json()
                        except ValueError:
                            payload = None
                        raise SteerserveError(response.status_code, payload, response.text[:500])
                    return response
                wait = max(wait, min(60.0, float(response.headers["Retry-After"])))
                response.close()
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._request(method, path, body).json()

    # --- endpoints ------------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/healthz")

    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["data"]

    def dictionaries(self) -> list[dict]:
        return self._json("GET", "/v1/dictionaries")["data"]

    def dictionary(self, name: str) -> dict:
        return self._json("GET", f"/v1/dictionaries/{name}")

    def feature(self, name: str, index: int) -> dict:
        return self._json("GET", f"/v1/dictionaries/{name}/features/{index}")

    def search_features(self, name: str, query: str, *, limit: int = 10) -> list[dict]:
        """Features of ``name`` whose promoted tokens or top contexts match ``query``, best first."""
        from urllib.parse import urlencode

        return self._json("GET", f"/v1/dictionaries/{name}/features?" + urlencode({"q": query, "limit": limit}))["data"]

    def generate(self, prompt: str, *, model: str | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 edits: list[dict] = (), include_baseline: bool = False,
                 return_features: tuple[str, int] | dict | None = None) -> dict:
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed, "stop": list(stop or []), "edits": list(edits),
                "include_baseline": include_baseline}
        if model:
            body["model"] = model
        if return_features is not None:
            body["return_features"] = (return_features if isinstance(return_features, dict)
                                       else {"dictionary": return_features[0], "top_k": return_features[1]})
        return self._json("POST", "/v1/generate", body)

    def complete(self, prompt: str | list, *, model: str | None = None, max_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, edits: list[dict] = (),
                 stream: bool = False, echo: bool = False, logprobs: int | None = None) -> dict | Iterator[dict]:
        """OpenAI-style completion; ``prompt`` may be a string, strings, token ids or token-id lists;
        ``echo=True, max_tokens=0, logprobs=N`` scores a text without generating."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "stop": list(stop or []) or None, "edits": list(edits), "stream": stream, "echo": echo,
                "logprobs": logprobs}
        if model:
            body["model"] = model
        if not stream:
            return self._json("POST", "/v1/completions", body)
        return self._events(self._request("POST", "/v1/completions", body, stream=True))

    @staticmethod
    def _events(response: requests.Response) -> Iterator[dict]:
        """The stream's events; :class:`StreamError` on an error event or when it ends (or the
        connection breaks) before ``[DONE]``."""
        received = []
        with response:
            try:
                for line in response.iter_lines(decode_unicode=True):
                    line = line.decode("utf-8") if isinstance(line, bytes) else line  # no charset sent
                    if not line or not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if isinstance(event, dict) and "error" in event:
                        raise StreamError(event, "", received)
                    received.append(event)
                    yield event
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                raise StreamError(None, f"the stream broke before [DONE] ({type(err).__name__}); the output is "
                                        "incomplete", received) from err
        raise StreamError(None, "the stream ended without [DONE]; the output is incomplete", received)

    def push(self, directory: str, name: str) -> dict:
        """Upload a native dictionary directory (admin); the store validates it fully."""
        from pathlib import Path

        directory = Path(directory)
        files = {part: (part, (directory / part).read_bytes())
                 for part in ("config.json", "sae.safetensors", "metrics.json") if (directory / part).is_file()}
        return self._request("PUT", f"/v1/dictionaries/{name}", files=files).json()

    def deploy(self, name: str, model: str | None = None) -> dict:
        return self._json("POST", f"/v1/dictionaries/{name}/deploy", {"model": model} if model else None)

    def undeploy(self, name: str, model: str | None = None) -> dict:
        return self._json("DELETE", f"/v1/dictionaries/{name}/deploy", {"model": model} if model else None)

    # --- steering presets -----------------------------------------------------------------------------

    def presets(self) -> list[dict]:
        return self._json("GET", "/v1/presets")["data"]

    def preset(self, name: str) -> dict:
        return self._json("GET", f"/v1/presets/{name}")

    def put_preset(self, name: str, edits: list[dict], *, model: str | None = None, description: str = "") -> dict:
        """Store a named edit list (admin); any request then selects it as ``"model": "BASE+NAME"``."""
        body = {"edits": list(edits), "description": description}
        if model:
            body["model"] = model
        return self._json("PUT", f"/v1/presets/{name}", body)

    def delete_preset(self, name: str) -> dict:
        return self._json("DELETE", f"/v1/presets/{name}")

    # --- jobs -------------------------------------------------------------------------------------------

    def evaluate(self, dictionary: str, *, edits: list[dict] = (), corpus: str = "builtin:pydocs/heldout",
                 tokens: int = 32768, model: str | None = None, target_tokens: list[str] = ()) -> dict:
        body = {"dictionary": dictionary, "edits": list(edits), "corpus": corpus, "tokens": tokens,
                "target_tokens": list(target_tokens)}
        if model:
            body["model"] = model
        return self._json("POST", "/v1/evaluations", body)

    def train(self, **settings) -> dict:
        """Start a training job (admin); ``settings`` are the fields of POST /v1/trainings."""
        return self._json("POST", "/v1/trainings", settings)

    def job(self, kind: str, job_id: str) -> dict:
        """``kind``: ``evaluations`` or ``trainings``."""
        return self._json("GET", f"/v1/{kind}/{job_id}")

    def cancel(self, kind: str, job_id: str) -> dict:
        return self._json("DELETE", f"/v1/{kind}/{job_id}")

    def wait(self, kind: str, job_id: str, *, poll: float = 1.0, timeout: float = 24 * 3600, on_progress=None) -> dict:
        """Poll a job until it finishes (or ``timeout`` seconds pass); ``on_progress(record)`` each poll."""
        deadline = time.time() + timeout
        while True:
            record = self.job(kind, job_id)
            if on_progress is not None:
                on_progress(record)
            if record["status"] in ("succeeded", "failed", "cancelled") or time.time() > deadline:
                return record
            time.sleep(poll)

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    # --- find and steer ---------------------------------------------------------------------------------

    def search(self, text: str, dictionary: str, *, span: tuple[int, int], unit: str = "char", top_k: int = 10,
               rank_by: str = "relative", model: str | None = None) -> dict:
        """The features most active on ``text[span[0]:span[1]]`` (``unit="token"``: a token range)."""
        body = {"text": text, "dictionary": dictionary, "span": {"start": span[0], "end": span[1], "unit": unit},
                "top_k": top_k, "rank_by": rank_by}
        return self._json("POST", "/v1/search", body | ({"model": model} if model else {}))

    @staticmethod
    def _contrast_set(side) -> dict:
        if isinstance(side, str):  # a corpus the server exposes, e.g. "builtin:pydocs/heldout"
            return {"corpus": side}
        if isinstance(side, dict):
            return side
        return {"texts": list(side)}

    def contrast(self, a, b, dictionary: str, *, unit: str = "text", top_k: int = 20, direction: str = "both",
                 include_vector: bool = True, save_vector: str | None = None, model: str | None = None) -> dict:
        """Features separating ``a`` from ``b`` (lists of texts, or corpus names such as
        ``"builtin:pydocs/heldout"``), and their difference-of-means vector; ``save_vector`` stores it (admin)."""
        body = {"dictionary": dictionary, "a": self._contrast_set(a), "b": self._contrast_set(b), "unit": unit,
                "top_k": top_k, "direction": direction, "include_vector": include_vector}
        if save_vector:
            body["save_vector"] = save_vector
        return self._json("POST", "/v1/contrast", body | ({"model": model} if model else {}))

    def compare(self, a: str, b: str, *, threshold: float = 0.5, offset: int = 0, limit: int = 50) -> dict:
        """MMCS both ways, the one-to-one matching, and matched pairs with cosine ≥ ``threshold``."""
        return self._json("GET", f"/v1/dictionaries/{a}/compare/{b}?threshold={threshold}&offset={offset}&limit={limit}")

    def vectors(self) -> list[dict]:
        return self._json("GET", "/v1/vectors")["data"]

    def vector(self, name: str) -> dict:
        return self._json("GET", f"/v1/vectors/{name}")

    def put_vector(self, name: str, values: list[float], hook: str, *, model: str | None = None,
                   description: str | None = None) -> dict:
        """Store a steering vector (admin)."""
        body = {"hook": hook, "values": list(values)} | ({"model": model} if model else {})
        return self._json("PUT", f"/v1/vectors/{name}", body | ({"description": description} if description else {}))

    def delete_vector(self, name: str) -> dict:
        return self._json("DELETE", f"/v1/vectors/{name}")

    def inspect(self, text: str, dictionary: str, *, top_k: int = 5, model: str | None = None) -> dict:
        body = {"text": text, "dictionary": dictionary, "top_k": top_k}
        if model:
            body["model"] = model
        return self._json("POST", "/v1/inspect", body)
