"""The Python client and the HTTP commands of the CLI, against the real server."""

import os
import socket
import subprocess
import sys

import pytest
import requests

from clients.client import Ablate, Add, Client, Scale, Set, SteerserveError
from tests.conftest import REPO

DEFAULT = "pythia-tiny-l2"


def test_client_generate_matches_raw_http(server):
    client = Client(server)
    edits = [Ablate(DEFAULT, 4), Scale(DEFAULT, 9, 3.0), Set("random-l1", 2, 5.0, positions="prompt"), Add(DEFAULT, 1, 1.5)]
    out = client.generate("Return the number of", max_new_tokens=8, edits=edits, include_baseline=True,
                          return_features=(DEFAULT, 2))
    raw = requests.post(server + "/v1/generate", json={"prompt": "Return the number of", "max_new_tokens": 8,
                                                       "edits": edits, "include_baseline": True,
                                                       "return_features": {"dictionary": DEFAULT, "top_k": 2}},
                        timeout=60).json()
    assert out["tokens"] == raw["tokens"] and out["baseline"] == raw["baseline"]
    assert len(out["edit_report"]) == 2 and len(out["features"]) == out["prompt_tokens"] + len(out["tokens"]) - 1


def test_client_errors_carry_the_envelope(server):
    client = Client(server)
    with pytest.raises(SteerserveError) as caught:
        client.generate("x", edits=[Ablate(DEFAULT, 10**6)])
    assert caught.value.status == 400 and caught.value.param == "edits[0].feature"
    assert "out of range" in caught.value.message
    with pytest.raises(SteerserveError) as caught:
        client.feature("nope", 1)
    assert caught.value.status == 404 and caught.value.type == "not_found_error"


def test_client_streams_and_describes(server):
    client = Client(server)
    plain = client.complete("class", max_tokens=10, temperature=0.0)
    chunks = list(client.complete("class", max_tokens=10, temperature=0.0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert client.health()["status"] == "ok"
    assert [m["id"] for m in client.models()] == ["pythia-tiny"]
    assert {d["name"] for d in client.dictionaries()} == {DEFAULT, "random-l1"}
    assert client.dictionary(DEFAULT)["config"]["architecture"] == "topk"
    assert client.feature(DEFAULT, 0)["feature"] == 0
    assert client.inspect("the end", DEFAULT, top_k=2)["dictionary"] == DEFAULT


def test_client_retries_then_gives_up_on_a_closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    client = Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, timeout=5)
    with pytest.raises(requests.ConnectionError):
        client.health()


def _cli(server, *args):
    return subprocess.run([sys.executable, "-m", "clients.cli", *args, "--server", server], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ})


def test_cli_talks_to_the_server(server):
    result = _cli(server, "generate", "Return the number of", "--edit", f"{DEFAULT}:7:set:6", "--baseline",
                  "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "baseline" in result.stdout and "| steered" in result.stdout and f"{DEFAULT} (blocks.2" in result.stdout
    inspected = _cli(server, "inspect", "Return the number", "--dictionary", DEFAULT)
    assert inspected.returncode == 0 and "'Return'" in inspected.stdout
    feature = _cli(server, "features", DEFAULT, "3")
    assert feature.returncode == 0 and "top contexts:" in feature.stdout and "promotes:" in feature.stdout
    bad = _cli(server, "generate", "x", "--edit", f"{DEFAULT}:999999:ablate")
    assert bad.returncode == 2 and "edits[0].feature" in bad.stderr and "Traceback" not in bad.stderr
