"""API keys, roles and per-key rate limits.

Keys come from the app's arguments, a JSON file (``STEERSERVE_API_KEYS_FILE``: a list of
``{"key", "role", "name", "rate_per_minute"}``) or the environment
(``STEERSERVE_API_KEYS="key1:admin,key2:user:120"``). A key has a role:

    user    generate, completions, inspect, read dictionaries
    admin   all of that, and the admin endpoints (/metrics, uploads, deploys, trainings)

Requests send ``Authorization: Bearer KEY``; a missing or unknown key is a 401, a role that
may not is a 403, and a key over its rate is a 429 with ``Retry-After``. Only SHA-256
digests of the keys are kept in memory. With no keys configured the service is open — and
``steerserve serve`` then binds to loopback only and says so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.protocol import ApiError

ROLES = {"user": 0, "admin": 1}


@dataclass(frozen=True)
class ApiKey:
    digest: str
    name: str
    role: str
    rate_per_minute: float | None = None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(entries: list[dict]) -> list[ApiKey]:
    keys = []
    for index, entry in enumerate(entries):
        key, role = entry.get("key"), entry.get("role", "user")
        if not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"api key {index}: 'key' must be a string of at least 8 characters")
        if role not in ROLES:
            raise ValueError(f"api key {index}: role {role!r} is not one of {', '.join(ROLES)}")
        rate = entry.get("rate_per_minute")
        if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
            raise ValueError(f"api key {index}: rate_per_minute must be a positive number")
        keys.append(ApiKey(_digest(key), str(entry.get("name") or f"key-{index}"), role, rate))
    return keys


def keys_from_environment() -> list[dict]:
    entries = []
    path = os.environ.get("STEERSERVE_API_KEYS_FILE")
    if path:
        entries += json.loads(Path(path).read_text())
    for item in filter(None, (os.environ.get("STEERSERVE_API_KEYS") or "").split(",")):
        parts = item.strip().split(":")
        entries.append({"key": parts[0], "role": parts[1] if len(parts) > 1 else "user",
                        "rate_per_minute": float(parts[2]) if len(parts) > 2 else None})
    return entries


class AccessControl:
    def __init__(self, entries: list[dict]):
        self.keys = {key.digest: key for key in parse_keys(entries)}
        self._buckets: dict[str, tuple[float, float]] = {}  # digest -> (tokens, last refill time)
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return not self.keys

    def authorize(self, authorization: str | None, role: str) -> ApiKey | None:
        """The caller's key, or an :class:`ApiError` (401, 403 or 429)."""
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
        """A token bucket a key: ``rate_per_minute`` tokens a minute, bursts up to that many."""
        if key.rate_per_minute is None:
            return
        capacity, per_second = key.rate_per_minute, key.rate_per_minute / 60.0
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
