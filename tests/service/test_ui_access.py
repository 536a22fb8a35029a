"""The page on an app with API keys (mounted under a route prefix): what a user key sees, an
admin deploying and undeploying from the page, 401 / 403 / 429 shown as messages, and the
playground's progress on a server that sends a stream's steps together (``stream_interval_s``)."""

import json
import re

import pytest
import requests

from tests.service.browser import browser, page, shots, wait_generated  # noqa: F401 - fixtures

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
    from service.model_server import Limits

    keys = [{"key": ADMIN, "role": "admin", "name": "root"}, {"key": USER, "role": "user", "name": "alice"},
            {"key": SLOW, "role": "user", "name": "slow", "rate_per_minute": 3}]
    # a stream's steps go out together at most every 0.5 s: events that carry several tokens each
    app = build_app(AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1)],
                            api_keys=keys, limits=Limits(stream_interval_s=0.5)))
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


def test_a_user_key_contrasts_but_cannot_store_the_vector(page, keyed):  # noqa: F811
    """Contrasting needs a user key; storing its vector (save_vector) an admin's: a user sees why not."""
    page.goto(f"{keyed}/#/contrast?dict={DEFAULT}&a=The%20argument%20is%20here.%0AAn%20argument."
              "&b=The%20value%20is%20here.%0AA%20value.")
    _use_key(page, USER)
    expect(page.get_by_test_id("contrast-table")).to_be_visible()
    panel = page.get_by_test_id("vector-panel")
    expect(panel).to_contain_text("Storing it as a steering vector needs an admin key")
    expect(panel.get_by_role("button")).to_have_count(0)


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


def test_a_wrong_key_gets_a_message(page, keyed, shots):  # noqa: F811
    page.goto(f"{keyed}/#/playground")
    _use_key(page, "not-a-key-of-this-server")
    refused = requests.get(f"{keyed}/v1/whoami", headers=_auth("not-a-key-of-this-server"), timeout=60)
    assert refused.status_code == 401
    expect(page.locator("#banner")).to_have_text(
        f"The server refused this API key (401): {refused.json()['error']['message']}. Type another above.")
    expect(page.locator("#whoami")).to_have_text("key refused")
    expect(page.locator("main .form-error").first).to_contain_text("Not signed in (401)")
    page.screenshot(path=shots("access-wrong-key"), full_page=True)


def test_the_playground_counts_tokens_not_stream_events(page, keyed):  # noqa: F811
    """With steps sent together, one event carries several tokens: the progress counts the tokens."""
    page.goto(f"{keyed}/#/playground?prompt=Return%20the%20number%20of&max_tokens=40&temperature=0"
              f"&edit={DEFAULT}:7:set:3@all")
    _use_key(page, USER)
    expect(page.locator("#whoami")).to_have_text("key alice · user")
    expect(page.get_by_test_id("steered")).to_be_visible()  # the view, drawn again for this key
    page.evaluate("""() => {
        window.__progress = [];
        const status = document.querySelector('[data-testid=steered] [role=status]');
        new MutationObserver(() => window.__progress.push(status.textContent))
            .observe(status, {subtree: true, childList: true, characterData: true});
    }""")
    def steered_stream(response):  # the stream with the edit
        return response.url.endswith("/v1/generate") and '"edits":[]' not in (response.request.post_data or "")

    with page.expect_response(steered_stream) as streamed:
        page.get_by_role("button", name="Generate").click()
        wait_generated(page)
    events = [json.loads(line[6:]) for line in streamed.value.text().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    final = events[-1]
    steered = page.get_by_test_id("steered")
    assert steered.get_attribute("data-tokens") == str(len(final["tokens"]))
    assert steered.get_attribute("data-events") == str(len(events))
    assert len(events) < len(final["tokens"]), "the server should have sent several tokens an event"
    counts, total = [], 0
    for event in events[:-1]:
        total += len(event["token_ids"])
        counts.append(total)
    shown = [int(m.group(1)) for text in page.evaluate("window.__progress")
             if (m := re.match(r"streaming… (\d+) / 40 tokens", text))]
    assert shown and set(shown) <= set(counts), (shown, counts)
    expect(steered.get_by_role("status")).to_have_text(f"{len(final['tokens'])} tokens · finish: {final['finish_reason']}")
