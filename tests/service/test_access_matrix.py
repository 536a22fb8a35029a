"""The access matrix: every route × {no key, user, admin, over-rate}, expected statuses from the
one route table (``service.routes.table``) that also writes the README's table.

A caller whose access is granted (``"ok"`` in the table) gets the route's probe answer: a cheap
request with no lasting effect whose status is known. A new route must add its probe here."""

import pytest
import requests

from service.routes import table
from tests.conftest import REPO, report
from tests.service.conftest import ADMIN_KEY, SLOW_KEY, USER_KEY, auth, start_keyed_app

DEFAULT = "pythia-tiny-l2"
BAD_CONFIG = {"config.json": ("config.json", b"{}"), "sae.safetensors": ("sae.safetensors", b"not weights")}

# (method, path) -> (concrete path, request keyword arguments, status once access is granted)
PROBES = {
    ("GET", "/healthz"): ("/healthz", {}, 200),
    ("GET", "/openapi.json"): ("/openapi.json", {}, 200),
    ("GET", "/docs"): ("/docs", {}, 200),
    ("GET", "/metrics"): ("/metrics", {}, 200),
    ("GET", "/v1/models"): ("/v1/models", {}, 200),
    ("POST", "/v1/generate"): ("/v1/generate", {"json": {"prompt": "x", "max_new_tokens": 1}}, 200),
    ("POST", "/v1/completions"): ("/v1/completions", {"json": {"prompt": "x", "max_tokens": 1}}, 200),
    ("POST", "/v1/inspect"): ("/v1/inspect", {"json": {"text": "x", "dictionary": DEFAULT}}, 200),
    ("GET", "/v1/dictionaries"): ("/v1/dictionaries", {}, 200),
    ("GET", "/v1/dictionaries/{name}"): (f"/v1/dictionaries/{DEFAULT}", {}, 200),
    ("GET", "/v1/dictionaries/{name}/features/{index}"): (f"/v1/dictionaries/{DEFAULT}/features/0", {}, 200),
    ("PUT", "/v1/dictionaries/{name}"): ("/v1/dictionaries/matrix-probe", {"files": BAD_CONFIG}, 400),
    ("POST", "/v1/dictionaries/{name}/deploy"): ("/v1/dictionaries/no-such-dictionary/deploy", {}, 404),
    ("DELETE", "/v1/dictionaries/{name}/deploy"): ("/v1/dictionaries/no-such-dictionary/deploy", {}, 200),
    ("GET", "/v1/evaluations"): ("/v1/evaluations", {}, 200),
    ("POST", "/v1/evaluations"): ("/v1/evaluations", {"json": {}}, 400),
    ("GET", "/v1/evaluations/{job_id}"): ("/v1/evaluations/eval-none", {}, 404),
    ("DELETE", "/v1/evaluations/{job_id}"): ("/v1/evaluations/eval-none", {}, 404),
    ("GET", "/v1/trainings"): ("/v1/trainings", {}, 200),
    ("POST", "/v1/trainings"): ("/v1/trainings", {"json": {}}, 400),
    ("GET", "/v1/trainings/{job_id}"): ("/v1/trainings/trai-none", {}, 404),
    ("DELETE", "/v1/trainings/{job_id}"): ("/v1/trainings/trai-none", {}, 404),
    ("GET", "/"): ("/", {}, 200),
    ("GET", "/ui/{asset}"): ("/ui/main.js", {}, 200),
    ("GET", "/v1/whoami"): ("/v1/whoami", {}, 200),
    ("GET", "/v1/presets"): ("/v1/presets", {}, 200),
    ("GET", "/v1/presets/{name}"): ("/v1/presets/no-such-preset", {}, 404),
    ("PUT", "/v1/presets/{name}"): ("/v1/presets/matrix-probe",
                                    {"json": {"edits": [{"dictionary": "nope", "feature": 1, "op": "ablate"}]}}, 400),
    ("DELETE", "/v1/presets/{name}"): ("/v1/presets/no-such-preset", {}, 404),
    ("POST", "/v1/search"): ("/v1/search", {"json": {}}, 400),
    ("POST", "/v1/contrast"): ("/v1/contrast", {"json": {}}, 400),
    ("GET", "/v1/vectors"): ("/v1/vectors", {}, 200),
    ("GET", "/v1/vectors/{name}"): ("/v1/vectors/no-such-vector", {}, 404),
    ("PUT", "/v1/vectors/{name}"): ("/v1/vectors/matrix-probe", {"json": {}}, 400),
    ("DELETE", "/v1/vectors/{name}"): ("/v1/vectors/no-such-vector", {}, 404),
    ("GET", "/v1/dictionaries/{a}/compare/{b}"): (f"/v1/dictionaries/{DEFAULT}/compare/{DEFAULT}", {}, 200),
    ("GET", "/v1/dictionaries/{name}/features"): (f"/v1/dictionaries/{DEFAULT}/features?q=file", {}, 200),
}
CALLERS = {"no key": None, "user": USER_KEY, "admin": ADMIN_KEY, "over-rate": SLOW_KEY}


def all_routes():
    import service.ingress  # noqa: F401 - declares every route

    return table.ROUTES + list(table.PUBLIC_FRAMEWORK_ROUTES)


@pytest.fixture(scope="module")
def keyed(server):
    from service.app import delete_app

    url = start_keyed_app(server, "matrix")
    requests.get(url + "/v1/models", headers=auth(SLOW_KEY), timeout=60)  # the slow key's one call: now it is over
    yield url
    delete_app("matrix")


def test_every_route_has_a_probe():
    declared = {(spec.method, spec.path) for spec in all_routes()}
    assert declared == set(PROBES), f"routes without a probe: {declared - set(PROBES)}; stale: {set(PROBES) - declared}"


def test_every_served_operation_is_declared_in_the_table(keyed):
    """A route added with a bare ``@app.<method>`` (no ``@route``) would escape the access check's
    single source and this matrix: it must not exist."""
    schema = requests.get(keyed + "/openapi.json", timeout=60).json()
    served = {(method.upper(), path) for path, operations in schema["paths"].items() for method in operations}
    assert served == {(spec.method, spec.path) for spec in table.ROUTES}


def test_the_access_matrix(keyed):
    outcomes = []
    for spec in all_routes():
        path, kwargs, granted = PROBES[(spec.method, spec.path)]
        for column, key in CALLERS.items():
            expected = spec.expected(column)
            expected = granted if expected == "ok" else expected
            answer = requests.request(spec.method, keyed + path, headers=auth(key), timeout=120, **kwargs)
            outcomes.append((spec.method, spec.path, column, expected, answer.status_code))
            if answer.status_code >= 400 and spec.path not in ("/docs", "/openapi.json"):
                assert set(answer.json()) == {"error"}, answer.text  # the envelope, always
            if answer.status_code == 429:
                assert int(answer.headers["Retry-After"]) >= 1
    wrong = [o for o in outcomes if o[3] != o[4]]
    report(f"access matrix: {len(all_routes())} routes x {len(CALLERS)} callers = {len(outcomes)} requests, "
          f"{len(outcomes) - len(wrong)} as expected")
    assert not wrong, wrong


def test_the_readme_shows_the_table():
    all_routes()
    assert table.markdown() in (REPO / "README.md").read_text(), \
        "README's access table is stale: regenerate it with `python -m service.routes.table`"
