"""The page on an app with API keys (mounted under a route prefix): what a user key sees, an
admin deploying and undeploying from the page, and 401 / 403 / 429 shown as messages."""

import re

import pytest
import requests

from tests.service.browser import browser, page, shots  # noqa: F401 - fixtures

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips these tests (or fails them, in CI)
    expect = None

DEFAULT = "pythia-tiny-l2"
ADMIN, USER, SLOW = "ui-admin-key-1", "ui-user-key-2", "ui-slow-key-3"
HOT = "ui-hot"


@pytest.fixture(scope="module")
def keyed(server, browser):  # noqa: F811 - browser first: no app is started when the tests would skip
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app

    keys = [{"key": ADMIN, "role": "admin", "name": "root"}, {"key": USER, "role": "user", "name": "alice"},
            {"key": SLOW, "role": "user", "name": "slow", "rate_per_minute": 3}]
    app = build_app(AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1)],
                            api_keys=keys))
    serve.run(app, name="ui-keyed", route_prefix="/ui-keyed")
    yield server + "/ui-keyed"
    serve.delete("ui-keyed")


@pytest.fixture()
def hot(keyed):
    """A dictionary in the store that nothing serves yet."""
    from dictionaries.config import DictionaryConfig
    from dictionaries.sae import Dictionary
    from dictionaries.store import DictionaryStore

    store = DictionaryStore()
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=64, hook="blocks.3.hook_resid_post",
                              model_name="pythia-tiny")
    store.put(HOT, Dictionary.random(config, seed=5))
    yield HOT
    requests.delete(f"{keyed}/v1/dictionaries/{HOT}/deploy", headers=_auth(ADMIN), timeout=120)
    store.delete(HOT)


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _use_key(page, key):  # noqa: F811
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use key").click()


def test_without_a_key_and_with_a_user_key(page, keyed, hot, shots):  # noqa: F811
    page.goto(keyed)  # no trailing slash: redirected, so the page's relative URLs resolve under the prefix
    expect(page.get_by_role("heading", name="Playground", exact=True)).to_be_visible()
    assert page.url.startswith(keyed + "/")
    banner = page.locator("#banner")
    expect(banner).to_contain_text("This server needs an API key (401)")
    expect(page.locator("main .form-error").first).to_contain_text("Not signed in (401): missing API key")
    page.screenshot(path=shots("access-no-key"), full_page=True)

    _use_key(page, USER)
    expect(page.locator("#whoami")).to_have_text("key alice · user")
    expect(banner).to_be_hidden()
    page.get_by_role("link", name="Dictionaries").click()
    table = page.locator("table.dictionaries")
    expect(table.locator(f"tr[data-name='{HOT}']")).to_contain_text("stored")
    expect(table.locator(f"tr[data-name='{DEFAULT}']")).to_contain_text("deployed")
    expect(page.get_by_role("button", name=re.compile("deploy", re.I))).to_have_count(0)
    expect(page.get_by_role("form", name="Upload a dictionary")).to_have_count(0)
    expect(page.get_by_text("need an admin key")).to_be_visible()
    page.screenshot(path=shots("dictionaries-user"), full_page=True)
    page.get_by_role("link", name="Jobs").click()
    expect(page.get_by_role("form", name="Start an evaluation")).to_be_visible()
    expect(page.get_by_role("form", name="Start a training")).to_have_count(0)
    # hidden on the page and refused by the server anyway
    refused = requests.post(f"{keyed}/v1/dictionaries/{HOT}/deploy", headers=_auth(USER), timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    # the key lasts for the browser session
    page.reload()
    expect(page.locator("#whoami")).to_have_text("key alice · user")
    page.get_by_role("button", name="Forget").click()
    expect(page.locator("#whoami")).to_have_text("no key")


def test_an_admin_deploys_and_undeploys_from_the_page(page, keyed, hot, shots):  # noqa: F811
    page.goto(f"{keyed}/#/dictionaries")
    _use_key(page, ADMIN)
    expect(page.locator("#whoami")).to_have_text("key root · admin")
    row = page.locator(f"table.dictionaries tr[data-name='{HOT}']")
    expect(row).to_contain_text("stored")
    page.get_by_role("button", name=f"Deploy {HOT}").click()
    expect(page.locator(f"table.dictionaries tr[data-name='{HOT}']")).to_contain_text("deployed", timeout=120_000)
    served = requests.get(f"{keyed}/v1/dictionaries", headers=_auth(ADMIN), timeout=60).json()["data"]
    assert HOT in [entry["name"] for entry in served]
    page.screenshot(path=shots("dictionaries-admin"), full_page=True)
    page.get_by_role("button", name=f"Undeploy {HOT}").click()
    expect(page.locator(f"table.dictionaries tr[data-name='{HOT}']")).to_contain_text("stored", timeout=120_000)
    served = requests.get(f"{keyed}/v1/dictionaries", headers=_auth(ADMIN), timeout=60).json()["data"]
    assert HOT not in [entry["name"] for entry in served]

    # a bad upload: the server's message beside the part it names
    config, weights = b'{"format": "not-a-dictionary"}', b"not safetensors"
    expected = requests.put(f"{keyed}/v1/dictionaries/ui-bad", headers=_auth(ADMIN), timeout=60, files={
        "config.json": ("config.json", config), "sae.safetensors": ("sae.safetensors", weights)}).json()["error"]
    form = page.get_by_role("form", name="Upload a dictionary")
    form.get_by_label("Name").fill("ui-bad")
    form.get_by_label("config.json").set_input_files({"name": "config.json", "mimeType": "application/json",
                                                      "buffer": config})
    form.get_by_label("sae.safetensors").set_input_files({"name": "sae.safetensors", "mimeType": "application/octet-stream",
                                                          "buffer": weights})
    form.get_by_role("button", name="Upload").click()
    slot = form.locator(f'[data-param="{expected["param"]}"] .field-error')
    expect(slot).to_have_text(f"Error 400: {expected['message']} (param: {expected['param']})")


def test_a_rate_limited_key_gets_a_message(page, keyed, shots):  # noqa: F811
    page.goto(f"{keyed}/#/playground")
    _use_key(page, SLOW)  # whoami, the models and the dictionaries: the three requests a minute it may make
    expect(page.locator("#whoami")).to_have_text("key slow · user")
    expect(page.get_by_role("button", name="Generate")).to_be_visible()
    page.get_by_role("button", name="Generate").click()
    message = page.locator("form .form-error").first
    expect(message).to_contain_text("Rate limited (429): rate limit of 3 requests a minute reached for key 'slow'")
    expect(message).to_contain_text(re.compile(r"retry in \d+ s$"))  # the server's Retry-After, said once
    page.screenshot(path=shots("playground-rate-limited"), full_page=True)


def test_the_server_refuses_a_user_key_even_where_the_page_is_fooled(page, keyed, hot, shots):  # noqa: F811
    """A page told (wrongly) that a user key is an admin's offers Deploy; the server answers 403, and
    the page shows that message beside the button."""
    page.route("**/v1/whoami", lambda route: route.fulfill(
        status=200, content_type="application/json", body='{"role": "admin", "name": "alice", "open": false}'))
    page.goto(f"{keyed}/#/dictionaries")
    _use_key(page, USER)
    button = page.get_by_role("button", name=f"Deploy {HOT}")
    button.click()
    refused = requests.post(f"{keyed}/v1/dictionaries/{HOT}/deploy", headers=_auth(USER), timeout=60).json()["error"]
    message = page.locator(f"table.dictionaries tr[data-name='{HOT}'] .form-error")
    expect(message).to_have_text(f"Not allowed for this key (403): {refused['message']}")
    expect(page.locator(f"table.dictionaries tr[data-name='{HOT}']")).to_contain_text("stored")
    page.screenshot(path=shots("dictionaries-forbidden"), full_page=True)
