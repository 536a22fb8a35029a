"""API keys, roles, rate limits and /metrics on a second app with keys configured."""

import re
import time

import pytest
import requests

DEFAULT = "pythia-tiny-l2"
ADMIN, USER, SLOW = "admin-key-123", "user-key-456", "slow-key-789"


@pytest.fixture(scope="module")
def secure(server):
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app

    keys = [{"key": ADMIN, "role": "admin", "name": "root"}, {"key": USER, "role": "user", "name": "alice"},
            {"key": SLOW, "role": "user", "name": "slow", "rate_per_minute": 3}]
    app = build_app(AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1)],
                            api_keys=keys))
    serve.run(app, name="secure", route_prefix="/secure")
    yield server + "/secure"
    serve.delete("secure")


def _get(url, path, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(url + path, headers=headers, timeout=60)


def _generate(url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + "/v1/generate", json={"prompt": "Return the", "max_new_tokens": 3,
                                                     "edits": [{"dictionary": DEFAULT, "feature": 1, "op": "ablate"}]},
                         headers=headers, timeout=60)


def test_keys_and_roles(secure):
    missing = _generate(secure)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert _generate(secure, "not-a-real-key").status_code == 401
    assert _generate(secure, USER).status_code == 200
    assert _generate(secure, ADMIN).status_code == 200
    forbidden = _get(secure, "/metrics", USER)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
    assert _get(secure, "/healthz").status_code == 200  # health checks need no key
    for path in ("/v1/models", "/v1/dictionaries", f"/v1/dictionaries/{DEFAULT}", f"/v1/dictionaries/{DEFAULT}/features/1"):
        assert _get(secure, path).status_code == 401
        assert _get(secure, path, USER).status_code == 200


def test_rate_limits(secure):
    answers = [_get(secure, "/v1/models", SLOW) for _ in range(4)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    limited = answers[3]
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["Retry-After"]) >= 1
    # other keys are not limited, and allowed calls never see a 429
    assert all(_get(secure, "/v1/models", USER).status_code == 200 for _ in range(10))


def test_metrics_count_what_happened(secure):
    _generate(secure, USER)
    _generate(secure)  # a 401
    text = ""
    for _ in range(100):  # replicas report their metrics with each registry heartbeat (0.25 s)
        text = _get(secure, "/metrics", ADMIN).text
        if re.search(r'^steerserve_batch_size_count\{model="pythia-tiny",replica="\w+"\} [1-9]', text, re.MULTILINE):
            break
        time.sleep(0.1)

    def value(pattern):
        match = re.search(pattern, text, re.MULTILINE)
        assert match, pattern
        return float(match.group(1))

    assert value(r'^steerserve_requests_total\{endpoint="/v1/generate",method="POST",status="200"\} (\S+)') >= 1
    assert value(r'^steerserve_requests_total\{endpoint="/v1/generate",method="POST",status="401"\} (\S+)') >= 1
    assert value(r'^steerserve_generated_tokens_total\{model="pythia-tiny"\} (\S+)') >= 3
    assert value(r'^steerserve_edits_applied_total\{model="pythia-tiny",op="ablate"\} (\S+)') >= 1
    assert value(r'^steerserve_request_seconds_count\{endpoint="/v1/generate"\} (\S+)') >= 2
    assert value(r'^steerserve_batch_size_count\{model="pythia-tiny",replica="\w+"\} (\S+)') >= 1
    assert value(r'^steerserve_engine_tokens_total\{model="pythia-tiny",replica="\w+"\} (\S+)') >= 3
    assert value(r'^steerserve_queue_depth\{model="pythia-tiny",replica="\w+"\} (\S+)') == 0
    assert "# TYPE steerserve_time_to_first_token_seconds histogram" in text
    assert "# TYPE steerserve_request_seconds histogram" in text


def test_an_open_server_needs_no_key(server):
    assert requests.get(server + "/metrics", timeout=30).status_code == 200
