"""The playground, driven by a real headless Chromium against the session's app on loopback.

Each test checks what a person sees against the API: the streamed texts and each column's token
features against POST /v1/generate, a shared link against the request it came from, the
server's error messages next to the fields that caused them, the report of an edit that did
nothing, and the value slider. Screenshots go to .test-home/screenshots/. The other views are in
test_ui_views.py, the find-and-steer additions in test_ui_steer.py, keys and roles in
test_ui_access.py.
"""

import contextlib
import io
import json
import re

import pytest
import requests

from tests.service.browser import browser, column_texts, open_view, page, sent_generations, shots  # noqa: F401
from tests.service.browser import wait_generated

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips these tests (or fails them, in CI)
    expect = None

DEFAULT = "pythia-tiny-l2"
EARLIER = "random-l1"  # the session's other dictionary: blocks.1.hook_resid_pre, before DEFAULT's layer


def _open(page, server, route, heading):  # noqa: F811
    open_view(page, f"{server}/{route}", heading)


def _generate(server, body: dict) -> dict:
    out = requests.post(server + "/v1/generate", json=body, timeout=120)
    assert out.status_code == 200, out.text
    return out.json()


def _tooltips(page, column: str) -> list:  # noqa: F811
    """Every token of a column, focused in turn: (position, the feature links its tooltip lists, or None
    when it says the token was not read)."""
    return page.evaluate("""(column) => [...document.querySelectorAll(`[data-testid=${column}-output] .tok`)].map(t => {
        t.focus();
        const tip = document.getElementById('token-tooltip');
        return [Number(t.dataset.position), t.dataset.read === '1' ? [...tip.querySelectorAll('a')].map(a => a.textContent) : null];
    })""", column)


def _links(features: list) -> dict:
    """position → the feature links a tooltip should list, from return_features."""
    return {entry["position"]: [f"#{f['feature']}" for f in entry["features"]] for entry in features}


# --- the playground ----------------------------------------------------------------------------------

def test_a_steered_generation_streams_and_equals_the_api(page, server, shots):  # noqa: F811
    _open(page, server, "#/playground", "Playground")
    page.get_by_label("Prompt").fill("If the file does not exist, the")
    page.get_by_label("Max tokens").fill("20")
    page.get_by_label("Temperature").fill("0.8")
    page.get_by_label("Seed").fill("11")
    page.get_by_role("button", name="+ Add an edit").click()
    edit = page.locator("fieldset.edit").first
    edit.get_by_label("…or find it by a word").fill("lineno")  # found by search, not typed in
    hit = edit.locator(".search-results button.hit").first
    expect(hit).to_be_visible()
    feature = int(hit.get_attribute("data-feature"))
    hit.click()
    expect(edit.get_by_label("Feature", exact=True)).to_have_value(str(feature))
    edit.get_by_label("Op", exact=True).select_option("set")
    edit.get_by_label("Value", exact=True).fill("6")
    expect(edit.get_by_label("Value (slider)")).to_have_value("6")
    # every text the steered column shows while it streams
    page.evaluate("""() => {
        window.__seen = [];
        const column = document.querySelector('[data-testid=steered-output]');
        new MutationObserver(() => {
            const generated = column.querySelector('.gen-text');
            if (generated) window.__seen.push(generated.textContent);
        }).observe(column, {subtree: true, childList: true, characterData: true});
    }""")
    # a slow link (Chromium's network emulation, 4 kB/s down), so that the events of the stream arrive
    # apart in time whatever the machine's load, and the page has something to show in between
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 4000,
                                                      "uploadThroughput": -1})
    page.get_by_role("button", name="Generate").click()
    wait_generated(page)
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1})
    shown = column_texts(page)

    body = {"prompt": "If the file does not exist, the", "model": "pythia-tiny", "max_new_tokens": 20, "temperature": 0.8,
            "top_p": 1, "seed": 11, "include_baseline": True,
            "edits": [{"dictionary": DEFAULT, "feature": feature, "op": "set", "value": 6.0, "positions": "all"}]}
    out = _generate(server, body)
    assert shown == {"steered": out["text"], "baseline": out["baseline"]["text"]}
    assert out["text"] != out["baseline"]["text"]  # the edit steers
    # it streamed: several events a column, and partial text on screen before the end
    for column, tokens in (("baseline", out["baseline"]["tokens"]), ("steered", out["tokens"])):
        assert int(page.get_by_test_id(column).get_attribute("data-events")) > 1
        assert page.get_by_test_id(column).get_attribute("data-tokens") == str(len(tokens))
        expect(page.get_by_test_id(column).get_by_role("status")).to_have_text(re.compile(rf"^{len(tokens)} tokens · "))
    seen = page.evaluate("window.__seen")
    assert any(0 < len(text) < len(out["text"]) for text in seen), seen

    # the edit report: the API's before/after activations, in the table
    [entry] = out["edit_report"]
    report = page.get_by_role("region", name="Edit report")
    expect(report).to_contain_text(f"{entry['positions_edited']} positions edited")
    cells = report.locator("tbody tr").first.locator("td").all_text_contents()
    assert cells[0] == f"#{feature}" and cells[1] == f"{DEFAULT}:{feature}:set:6"
    assert float(cells[3]) == pytest.approx(entry["features"][0]["mean_before"], abs=1e-3)
    assert float(cells[4]) == pytest.approx(entry["features"][0]["mean_after"], abs=1e-3)

    # the tokens' top features, as this run read them: by keyboard (one tab stop, arrows move) ...
    readout = {"dictionary": DEFAULT, "top_k": 5}
    steered_run = _generate(server, {**body, "include_baseline": False, "return_features": readout})
    assert steered_run["text"] == out["text"]
    read = _links(steered_run["features"])
    tooltip = page.get_by_role("tooltip")
    page.locator("[data-testid=steered-output] .tok").first.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.position") == "2"
    expect(tooltip).to_be_visible()
    assert tooltip.locator("a").all_text_contents() == read[2]
    page.keyboard.press("Tab")  # leave the tokens: the tooltip goes
    expect(tooltip).to_be_hidden()
    # ... and by hovering a generated token
    page.evaluate("document.activeElement.blur()")
    token = page.locator("[data-testid=steered-output] .tok.gen[data-read='1']").filter(has_text=re.compile(r"\w")).last
    position = int(token.get_attribute("data-position"))
    token.hover()
    expect(tooltip).to_be_visible()
    assert tooltip.locator("a").all_text_contents() == read[position]
    assert page.get_by_test_id("steered-output").text_content() == body["prompt"] + out["text"]
    page.screenshot(path=shots("playground"), full_page=True)

    # "Copy as curl" and "Copy as Python" hold this very request
    page.get_by_text("The same request as curl and Python").click()
    curl = page.get_by_test_id("curl").text_content()
    sent = json.loads(curl.split(" -d '", 1)[1].rstrip("'").replace("'\\''", "'"))
    assert sent == body
    python = page.get_by_test_id("python").text_content()
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(python, "playground-snippet", "exec"), namespace)  # the snippet, as a user would run it
    assert namespace["out"]["text"] == out["text"] and namespace["out"]["baseline"] == out["baseline"]
    assert f"steered:  {out['text']}" in printed.getvalue()


def test_each_columns_token_features_are_its_own_runs(page, server):  # noqa: F811
    """An edit at an earlier layer than the read-out dictionary changes the activations there: the steered
    column's tooltips show the steered run's features (return_features), not the unedited model's on the
    same text; the baseline's are the unedited run's. The last token is sampled, never read."""
    prompt = "Return the number of lines in the"
    _open(page, server, "#/playground", "Playground")
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Max tokens").fill("10")
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("button", name="+ Add an edit").click()
    edit = page.locator("fieldset.edit").first
    edit.get_by_label("Dictionary", exact=True).select_option(EARLIER)
    edit.get_by_label("Feature", exact=True).fill("3")
    edit.get_by_label("Value", exact=True).fill("8")
    page.get_by_label("Token features from").select_option(DEFAULT)
    page.get_by_role("button", name="Generate").click()
    wait_generated(page)

    common = {"prompt": prompt, "max_new_tokens": 10, "temperature": 0, "top_p": 1,
              "return_features": {"dictionary": DEFAULT, "top_k": 5}}
    steered = _generate(server, {**common, "edits": [{"dictionary": EARLIER, "feature": 3, "op": "set", "value": 8}]})
    baseline = _generate(server, {**common, "edits": []})
    assert column_texts(page) == {"steered": steered["text"], "baseline": baseline["text"]}
    for column, run in (("steered", steered), ("baseline", baseline)):
        read = _links(run["features"])
        tips = _tooltips(page, column)
        last = run["prompt_tokens"] + len(run["tokens"]) - 1
        assert [position for position, _ in tips] == list(range(last + 1))
        assert dict(tips) == {**read, last: None}  # every read token as its run read it; the last one not read
    # what /v1/inspect says of the steered text (the unedited model's features) is not what the page shows
    unedited = requests.post(server + "/v1/inspect", json={"text": prompt + steered["text"], "dictionary": DEFAULT,
                                                          "top_k": 5}, timeout=60).json()["tokens"]
    differs = [t["position"] for t in unedited if t["position"] in _links(steered["features"])
               and _links(steered["features"])[t["position"]] != [f"#{f['feature']}" for f in t["features"]]]
    assert differs, "the edit should change the read-out dictionary's features somewhere"


def test_a_shared_link_reproduces_the_request(page, browser, server, shots):  # noqa: F811
    _open(page, server, "#/playground", "Playground")
    first = sent_generations(page)
    page.get_by_label("Prompt").fill("Raise an exception if")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Temperature").fill("0.6")
    page.get_by_label("Seed").fill("")  # the page picks a seed and puts it in the link
    page.get_by_label("Stop strings").fill("\\n\\n|.")
    for feature, op, value, positions in ((11, "scale", "3", "prompt"), (3, "ablate", None, "generated")):
        page.get_by_role("button", name=re.compile(r"\+ Add (an|another) edit")).click()
        edit = page.locator("fieldset.edit").last
        edit.get_by_label("Feature", exact=True).fill(str(feature))
        edit.get_by_label("Op", exact=True).select_option(op)
        if value is not None:
            edit.get_by_label("Value", exact=True).fill(value)
        edit.get_by_label("Positions", exact=True).select_option(positions)
    page.get_by_role("button", name="Generate").click()
    wait_generated(page)
    link, texts = page.url, column_texts(page)
    seed = page.get_by_label("Seed").input_value()
    assert seed and f"seed={seed}" in link and "run=1" in link

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        other = context.new_page()
        second = sent_generations(other)
        other.goto(link)  # opening the link generates at once
        wait_generated(other)
        assert column_texts(other) == texts
        assert sorted(second, key=json.dumps) == sorted(first, key=json.dumps)
        steered = next(body for body in second if body["edits"])
        assert steered == {"prompt": "Raise an exception if", "model": "pythia-tiny", "max_new_tokens": 12,
                           "temperature": 0.6, "top_p": 1, "seed": int(seed), "stop": ["\n\n", "."], "stream": True,
                           "return_features": {"dictionary": DEFAULT, "top_k": 5},
                           "edits": [{"dictionary": DEFAULT, "feature": 11, "op": "scale", "value": 3, "positions": "prompt"},
                                     {"dictionary": DEFAULT, "feature": 3, "op": "ablate", "positions": "generated"}]}
        assert other.get_by_label("Stop strings").input_value() == "\\n\\n|."
        other.screenshot(path=shots("playground-shared-link"), full_page=True)
    finally:
        context.close()


def test_a_bad_value_shows_the_servers_message_next_to_its_field(page, server, shots):  # noqa: F811
    _open(page, server, "#/playground", "Playground")
    page.get_by_label("Max tokens").fill("1000")
    page.get_by_role("button", name="Generate").click()
    refused = requests.post(server + "/v1/generate", json={"prompt": "Return the number of", "max_new_tokens": 1000,
                                                           "temperature": 0, "top_p": 1, "edits": []}, timeout=60)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "max_new_tokens"
    slot = page.locator('[data-param="max_tokens"] .field-error')  # the box the page calls Max tokens
    expect(slot).to_be_visible()
    expect(slot).to_have_text(f"Error 400: {error['message']} (param: {error['param']})")
    expect(page.get_by_label("Max tokens")).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="+ Add an edit").click()
    page.get_by_label("Feature", exact=True).fill("99999")
    page.get_by_role("button", name="Generate").click()
    wait_generated(page)
    edit_error = requests.post(server + "/v1/generate", json={
        "prompt": "Return the number of", "max_new_tokens": 8, "edits": [
            {"dictionary": DEFAULT, "feature": 99999, "op": "set", "value": 4}]}, timeout=60).json()["error"]
    assert edit_error["param"] == "edits[0].feature"
    slot = page.locator('[data-param="edits[0].feature"] .field-error')
    expect(slot).to_have_text(f"Error 400: {edit_error['message']} (param: edits[0].feature)")
    expect(page.locator('[data-param="max_tokens"] .field-error')).to_be_hidden()  # the old error is gone
    expect(page.get_by_test_id("baseline")).to_have_attribute("data-state", "done")  # the baseline still ran
    page.screenshot(path=shots("playground-error"), full_page=True)


def test_the_token_features_error_is_beside_its_control(page, server):  # noqa: F811
    """A link naming a dictionary this server does not load for the token features: the server's
    refusal appears beside "Token features from", not under the columns."""
    _open(page, server, "#/playground?prompt=Return%20the&max_tokens=4&readout=not-here&run=1", "Playground")
    wait_generated(page)
    error = requests.post(server + "/v1/generate", json={"prompt": "Return the", "max_new_tokens": 4, "stream": True,
                                                          "return_features": {"dictionary": "not-here", "top_k": 5}},
                          timeout=60).json()["error"]
    slot = page.locator('[data-param="readout"] .field-error')
    expect(slot).to_have_text(f"Error 400: {error['message']} (param: {error['param']})")
    expect(page.get_by_label("Token features from")).to_have_attribute("aria-invalid", "true")
    for column in ("baseline", "steered"):
        expect(page.get_by_test_id(column).locator(".form-error")).to_be_hidden()


def test_an_edit_that_changes_nothing_says_so(page, server, shots):  # noqa: F811
    """Ablating a feature that is never active on this generation: the report says so, with the API's note."""
    prompt, request = "Return the number of", {"max_new_tokens": 8, "temperature": 0, "top_p": 1}
    plain = _generate(server, {"prompt": prompt, **request, "return_features": {"dictionary": DEFAULT, "top_k": 64}})
    assert all(len(entry["features"]) < 64 for entry in plain["features"])  # each token's whole active set
    active = {f["feature"] for entry in plain["features"] for f in entry["features"]}
    silent = min(set(range(1024)) - active)
    out = _generate(server, {"prompt": prompt, **request, "edits": [{"dictionary": DEFAULT, "feature": silent, "op": "ablate"}]})
    [entry] = out["edit_report"]
    assert entry["changed"] is False and out["text"] == plain["text"]

    _open(page, server, "#/playground", "Playground")
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="+ Add an edit").click()
    edit = page.locator("fieldset.edit").first
    edit.get_by_label("Feature", exact=True).fill(str(silent))
    edit.get_by_label("Op", exact=True).select_option("ablate")
    page.get_by_role("button", name="Generate").click()
    wait_generated(page)
    message = page.get_by_test_id("nochange")
    expect(message).to_have_text(f"This edit changed nothing. {entry['note']}")
    expect(page.get_by_role("region", name="Edit report").locator("tbody tr").first).to_contain_text("changed nothing")
    page.screenshot(path=shots("playground-nochange"), full_page=True)


def test_the_value_slider_reaches_a_typed_value(page, server):  # noqa: F811
    """A value beyond the slider's usual ±20 widens the slider to it: touching the slider starts from the value."""
    _open(page, server, "#/playground", "Playground")
    page.get_by_role("button", name="+ Add an edit").click()
    edit = page.locator("fieldset.edit").first
    edit.get_by_label("Op", exact=True).select_option("set")
    value, slider = edit.get_by_label("Value", exact=True), edit.get_by_label("Value (slider)")
    value.fill("50")
    expect(slider).to_have_value("50")
    assert float(slider.get_attribute("max")) >= 50
    slider.focus()  # touching it changes nothing ...
    expect(value).to_have_value("50")
    slider.press("ArrowLeft")  # ... and it moves from the value, not from a clamp at 20
    expect(value).to_have_value("49.9")
    value.fill("-35")
    expect(slider).to_have_value("-35")
    assert float(slider.get_attribute("min")) <= -35
    slider.press("ArrowRight")
    expect(value).to_have_value("-34.9")
