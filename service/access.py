"""API keys, roles and per-key rate limits.

Keys come from the app's arguments, a JSON file (``STEERSERVE_API_KEYS_FILE``: a list of
``{"key", "role", "name", "rate_per_minute"}``) or the environment
(``STEERSERVE_API_KEYS="key1:admin,key2:user:120"``). A key has a role:

    user    generate, completions, inspect, read dictionaries, run (and see, cancel) own evaluations
    admin   all of that, and the admin endpoints (/metrics, uploads, deploys, trainings, every job)

Which role each route needs is declared once, in :mod:`service.routes.table`. Requests send
``Authorization: Bearer KEY``; a missing or unknown key is a 401, a role that may not is a
403, and a key over its rate is a 429 with ``Retry-After``.

Keys never travel as keys: the process that builds the app reads them and hands the ingress
only their SHA-256 digests (:func:`resolve_keys`), so no Ray ``runtime_env``, actor argument
or dashboard shows a usable key. With no keys configured the service is open (every caller
is an admin, the local user), and then it only ever listens on loopback:
:func:`require_keys_off_loopback` refuses anything else, whichever way the app is started.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.protocol import ApiError

ROLES = {"user": 0, "admin": 1}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANONYMOUS = "anonymous"  # the owner of jobs on an open (keyless, loopback-only) service
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ApiKey:
    digest: str
    name: str
    """Unique among the keys: jobs are owned by it."""
    role: str
    rate_per_minute: float | None = None

    def public(self) -> dict:
        """What may cross a process boundary: everything but the key itself."""
        return {"digest": self.digest, "name": self.name, "role": self.role, "rate_per_minute": self.rate_per_minute}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(entries: list[dict]) -> list[ApiKey]:
    """Entries hold a ``key`` or (as the ingress receives them) only its SHA-256 ``digest``."""
    keys, names = [], set()
    for index, entry in enumerate(entries):
        key, digest, role = entry.get("key"), entry.get("digest"), entry.get("role", "user")
        if digest is not None:
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                raise ValueError(f"api key {index}: 'digest' must be 64 lowercase hex characters (a SHA-256)")
        elif not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"api key {index}: 'key' must be a string of at least 8 characters")
        if role not in ROLES:
            raise ValueError(f"api key {index}: role {role!r} is not one of {', '.join(ROLES)}")
        rate = entry.get("rate_per_minute")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not math.isfinite(rate) or rate <= 0):
            raise ValueError(f"api key {index}: rate_per_minute must be a positive, finite number")
        name = str(entry.get("name") or f"key-{index}")
        if name in names:
            raise ValueError(f"api key {index}: the name {name!r} is already another key's (jobs are owned by name)")
        names.add(name)
        keys.append(ApiKey(digest or _digest(key), name, role, float(rate) if rate is not None else None))
    return keys


def keys_from_environment() -> list[dict]:
    entries = []
    path = os.environ.get("STEERSERVE_API_KEYS_FILE")
    if path:
        entries += json.loads(Path(path).read_text())
    for index, item in enumerate(filter(None, (os.environ.get("STEERSERVE_API_KEYS") or "").split(","))):
        parts = item.strip().split(":")
        entries.append({"key": parts[0], "role": parts[1] if len(parts) > 1 else "user", "name": f"env-{index}",
                        "rate_per_minute": float(parts[2]) if len(parts) > 2 else None})
    return entries


def resolve_keys(entries: list[dict] | None) -> list[dict]:
    """The keys the ingress gets: ``entries`` (the environment's when None), validated and reduced
    to digests. Called where the app is built, never in a worker."""
    return [key.public() for key in parse_keys(keys_from_environment() if entries is None else entries)]


def require_keys_off_loopback(host: str | None, keys: list) -> None:
    """Refuse an open (keyless) service on anything but loopback."""
    if not keys and host is not None and host not in LOOPBACK:
        raise ValueError(f"no API keys are configured, so the service may only listen on loopback, not {host!r}: "
                         "set STEERSERVE_API_KEYS_FILE (or STEERSERVE_API_KEYS, or api_keys in the app's args)")


class AccessControl:
    def __init__(self, entries: list[dict]):
        self.keys = {key.digest: key for key in parse_keys(entries)}
        self._buckets: dict[str, tuple[float, float]] = {}  # digest -> (tokens, last refill time)
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return not self.keys

    def authorize(self, authorization: str | None, role: str) -> ApiKey | None:
        """The caller's key (None on an open service), or an :class:`ApiError` (401, 403 or 429)."""
        if self.open:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", type="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = _digest(token.strip())
        key = next((k for d, k in self.keys.items() if hmac.compare_digest(d, digest)), None)
        if key is None:
            raise ApiError(401, "invalid API key", type="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        if ROLES[key.role] < ROLES[role]:
            raise ApiError(403, f"this endpoint needs the {role} role; key {key.name!r} has {key.role}",
                           type="permission_error")
        self._take(key)
        return key

    def _take(self, key: ApiKey) -> None:
        """A token bucket a key: ``rate_per_minute`` tokens a minute, bursts up to that many (at
        least one, so a rate below one a minute still lets a request through now and then)."""
        if key.rate_per_minute is None:
            return
        capacity, per_second = max(1.0, key.rate_per_minute), key.rate_per_minute / 60.0
        with self._lock:
            now = time.monotonic()
            tokens, last = self._buckets.get(key.digest, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * per_second)
            if tokens < 1.0:
                self._buckets[key.digest] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / per_second)
                raise ApiError(429, f"rate limit of {key.rate_per_minute:g} requests a minute reached for key "
                                    f"{key.name!r}; retry in {wait} s", type="rate_limit_error",
                               headers={"Retry-After": str(wait)})
            self._buckets[key.digest] = (tokens - 1.0, now)


def identity(key: ApiKey | None) -> tuple[str, bool]:
    """(owner name, is admin) of a caller: jobs are owned by key name."""
    return (ANONYMOUS, True) if key is None else (key.name, key.role == "admin")
