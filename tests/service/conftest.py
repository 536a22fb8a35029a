"""One real Ray Serve app on loopback for the whole test session."""

import os
import shutil
import socket

import pytest

from tests.conftest import TEST_HOME


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served_dictionaries(pythia_tiny, default_dictionary):
    """The default dictionary and a random one on another layer, both in the test store."""
    from dictionaries.config import DictionaryConfig
    from dictionaries.sae import Dictionary
    from dictionaries.store import DictionaryStore

    store = DictionaryStore()
    if "random-l1" not in store:
        config = DictionaryConfig(architecture="jumprelu", d_in=128, d_sae=256, hook="blocks.1.hook_resid_pre",
                                  model_name="pythia-tiny", model_sha256=pythia_tiny.info.sha256)
        store.put("random-l1", Dictionary.random(config, seed=3))
    return {default_dictionary[0]: default_dictionary[1], "random-l1": store.load("random-l1")}


SERVER: dict = {}  # the session app's arguments, for the restart test


REGISTERED = TEST_HOME / "corpora"


def registered_corpora() -> dict[str, str]:
    """Corpora an admin registers in the session app's config: a text file, and a file that is
    gone by the time a job reads it (its job must fail without naming the server's path)."""
    REGISTERED.mkdir(parents=True, exist_ok=True)
    notes = REGISTERED / "notes.txt"
    notes.write_text("\n\n".join(f"Return the {w} of the object. If the {w} is missing, raise an error; "
                                   f"the {w} is checked by each call to the function." for w in
                                   ("value", "name", "size", "key", "path", "type", "count", "index") * 8))
    return {"notes": str(notes), "vanished": str(REGISTERED / "vanished.txt")}


@pytest.fixture(scope="session")
def server(served_dictionaries):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray import serve

    from service.app import AppArgs, ModelArgs, run
    from service.model_server import Limits

    shutil.rmtree(TEST_HOME / "presets", ignore_errors=True)  # steering presets an interrupted run left behind
    args = AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=sorted(served_dictionaries), torch_threads=2)],
                   limits=Limits(max_new_tokens=64, max_prompt_tokens=256, max_edits=8, max_body_bytes=16384),
                   corpora={"builtin:pydocs": "builtin:pydocs", **registered_corpora()})
    url = run(args, port=_free_port(), temp_dir=TEST_HOME / "ray", name="steerserve-test")
    SERVER["args"] = args
    yield url
    serve.shutdown()
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def engine(pythia_tiny, served_dictionaries):
    """The in-process engine the served results are compared with."""
    from editing.engine import Engine

    return Engine(pythia_tiny.model, pythia_tiny.tokenizer, dict(served_dictionaries))


ADMIN_KEY, USER_KEY, OTHER_KEY, SLOW_KEY = "admin-key-0123", "user-key-4567", "other-key-8901", "slow-key-2345"
KEYS = [{"key": ADMIN_KEY, "role": "admin", "name": "root"}, {"key": USER_KEY, "role": "user", "name": "alice"},
        {"key": OTHER_KEY, "role": "user", "name": "bob"},
        {"key": SLOW_KEY, "role": "user", "name": "slow", "rate_per_minute": 0.01}]  # one call, then 429 for ~100 min


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def start_keyed_app(server: str, name: str, limits=None, replicas: int = 1, corpora: dict | None = None) -> str:
    """A second app with API keys (``KEYS``) on the session's Ray instance, at ``/<name>``."""
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app
    from service.model_server import Limits

    args = AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=["pythia-tiny-l2"], torch_threads=1,
                                     replicas=replicas, num_cpus=0.25)],  # a CPU stays free for job tasks
                   api_keys=KEYS, limits=limits or Limits(max_new_tokens=16, max_prompt_tokens=128, max_edits=4,
                                                          max_body_bytes=16384, max_jobs_per_key=2),
                   **({"corpora": corpora} if corpora is not None else {}))
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"{server}/{name}"
