"""The browser page, driven by a real headless Chromium against the session's app on loopback.

Each test checks what a person sees against the API: the playground's streamed texts against
POST /v1/generate, a shared link against the request it came from, the feature page's
shading against the feature's statistics, the inspector against POST /v1/inspect, the
server's error messages next to the fields that caused them, and an evaluation job started
from its form. Screenshots of each view go to .test-home/screenshots/.
"""

import contextlib
import io
import json
import re

import pytest
import requests

from tests.service.browser import browser, page, shots  # noqa: F401 - fixtures

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips these tests (or fails them, in CI)
    expect = None

DEFAULT = "pythia-tiny-l2"


def _alpha(color: str) -> float:
    """The alpha of a computed CSS colour: rgb(...) is opaque, rgba(r, g, b, a)."""
    parts = re.findall(r"[\d.]+", color)
    return float(parts[3]) if len(parts) == 4 else 1.0


def _open(page, server, route, heading):  # noqa: F811
    page.goto(f"{server}/{route}")
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()


def _wait_generated(page):  # noqa: F811
    for column in ("baseline", "steered"):
        expect(page.get_by_test_id(column)).to_have_attribute("data-state", re.compile("done|error"))


def _texts(page):  # noqa: F811
    return {column: page.get_by_test_id(column).get_attribute("data-text") for column in ("baseline", "steered")}


def _sent_bodies(page):  # noqa: F811
    """Record the JSON bodies of the page's POSTs to /v1/completions."""
    bodies = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/completions")
            and bodies.append(r.post_data_json))
    return bodies


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
    _wait_generated(page)
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1})
    shown = _texts(page)

    body = {"prompt": "If the file does not exist, the", "model": "pythia-tiny", "max_new_tokens": 20, "temperature": 0.8, "top_p": 1,
            "seed": 11, "include_baseline": True,
            "edits": [{"dictionary": DEFAULT, "feature": feature, "op": "set", "value": 6.0, "positions": "all"}]}
    out = requests.post(server + "/v1/generate", json=body, timeout=120).json()
    assert shown == {"steered": out["text"], "baseline": out["baseline"]["text"]}
    assert out["text"] != out["baseline"]["text"]  # the edit steers
    # it streamed: several events a column, and partial text on screen before the end
    for column in ("baseline", "steered"):
        assert int(page.get_by_test_id(column).get_attribute("data-chunks")) > 1
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

    # the tokens' top features, as /v1/inspect reads them: by keyboard (one tab stop, arrows move) ...
    read = requests.post(server + "/v1/inspect", json={"text": body["prompt"] + out["text"], "dictionary": DEFAULT,
                                                      "top_k": 5}, timeout=60).json()
    tooltip = page.get_by_role("tooltip")
    page.locator("[data-testid=steered-output] .tok").first.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.position") == "2"
    expect(tooltip).to_be_visible()
    assert tooltip.locator("a").all_text_contents() == [f"#{f['feature']}" for f in read["tokens"][2]["features"]]
    page.keyboard.press("Tab")  # leave the tokens: the tooltip goes
    expect(tooltip).to_be_hidden()
    # ... and by hovering a generated token
    token = page.locator("[data-testid=steered-output] .tok.gen").filter(has_text=re.compile(r"\w")).last
    position = int(token.get_attribute("data-position"))
    token.hover()
    expect(tooltip).to_be_visible()
    assert tooltip.locator("a").all_text_contents() == [f"#{f['feature']}" for f in read["tokens"][position]["features"]]
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


def test_a_shared_link_reproduces_the_request(page, browser, server, shots):  # noqa: F811
    _open(page, server, "#/playground", "Playground")
    first = _sent_bodies(page)
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
    _wait_generated(page)
    link, texts = page.url, _texts(page)
    seed = page.get_by_label("Seed").input_value()
    assert seed and f"seed={seed}" in link and "run=1" in link

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        other = context.new_page()
        second = _sent_bodies(other)
        other.goto(link)  # opening the link generates at once
        _wait_generated(other)
        assert _texts(other) == texts
        assert sorted(second, key=json.dumps) == sorted(first, key=json.dumps)
        steered = next(body for body in second if body["edits"])
        assert steered == {"prompt": "Raise an exception if", "model": "pythia-tiny", "max_tokens": 12,
                           "temperature": 0.6, "top_p": 1, "seed": int(seed), "stop": ["\n\n", "."], "stream": True,
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
    refused = requests.post(server + "/v1/completions", json={"prompt": "Return the number of", "max_tokens": 1000,
                                                              "temperature": 0, "top_p": 1, "edits": []}, timeout=60)
    error = refused.json()["error"]
    assert refused.status_code == 400
    slot = page.locator('[data-param="max_tokens"] .field-error')
    expect(slot).to_be_visible()
    expect(slot).to_have_text(f"Error 400: {error['message']} (param: {error['param']})")
    expect(page.get_by_label("Max tokens")).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="+ Add an edit").click()
    page.get_by_label("Feature", exact=True).fill("99999")
    page.get_by_role("button", name="Generate").click()
    _wait_generated(page)
    edit_error = requests.post(server + "/v1/completions", json={
        "prompt": "Return the number of", "max_tokens": 8, "edits": [
            {"dictionary": DEFAULT, "feature": 99999, "op": "set", "value": 4}]}, timeout=60).json()["error"]
    assert edit_error["param"] == "edits[0].feature"
    slot = page.locator('[data-param="edits[0].feature"] .field-error')
    expect(slot).to_have_text(f"Error 400: {edit_error['message']} (param: edits[0].feature)")
    expect(page.locator('[data-param="max_tokens"] .field-error')).to_be_hidden()  # the old error is gone
    expect(page.get_by_test_id("baseline")).to_have_attribute("data-state", "done")  # the baseline still ran
    page.screenshot(path=shots("playground-error"), full_page=True)


# --- feature pages -----------------------------------------------------------------------------------

def test_the_feature_page_shades_top_contexts_by_activation(page, server, shots):  # noqa: F811
    feature = 7
    stats = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features/{feature}", timeout=60).json()
    _open(page, server, f"#/feature/{DEFAULT}/{feature}", f"{DEFAULT} · feature {feature}")
    expect(page.get_by_test_id("density")).to_have_text(f"{100 * stats['density']:.3f}%")
    shown = page.evaluate("""() => [...document.querySelectorAll('[data-testid=contexts] > li')].map(li => ({
        max: Number(li.dataset.max),
        tokens: [...li.querySelectorAll('.tok')].map(t => ({
            text: t.textContent, activation: Number(t.dataset.activation),
            background: getComputedStyle(t).backgroundColor})) }))""")
    contexts = stats["top_contexts"]
    assert [c["max"] for c in shown] == pytest.approx([c["max_activation"] for c in contexts])
    assert [c["max_activation"] for c in contexts] == sorted((c["max_activation"] for c in contexts), reverse=True)
    peak = max(c["max_activation"] for c in contexts)
    tokens = []
    for on_page, from_api in zip(shown, contexts):
        assert [t["text"] for t in on_page["tokens"]] == [t["token"].replace("\n", "↵") for t in from_api["tokens"]]
        assert [t["activation"] for t in on_page["tokens"]] == pytest.approx([t["activation"] for t in from_api["tokens"]])
        tokens += [(t["activation"], _alpha(t["background"])) for t in on_page["tokens"]]
    # one scale for the whole page: darker exactly where the activation is larger
    for activation, alpha in tokens:
        assert alpha == pytest.approx(max(activation, 0) / peak, abs=0.01)
    for a_act, a_alpha in tokens:
        for b_act, b_alpha in tokens:
            if a_act > b_act + 0.01 * peak:
                assert a_alpha > b_alpha
    lens = page.get_by_role("region", name="Logit lens")
    promoted = lens.locator("section[aria-label=Promoted] tbody tr td:first-child").all_text_contents()
    assert promoted == [json.dumps(p["token"], ensure_ascii=False) for p in stats["logit_lens"]["promoted"]]
    page.screenshot(path=shots("feature"), full_page=True)

    page.get_by_role("link", name="Next →").click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {feature + 1}")).to_be_visible()
    page.get_by_role("link", name="← Previous").click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {feature}")).to_be_visible()
    page.get_by_role("link", name="Steer with this feature").click()
    expect(page.get_by_role("heading", name="Playground", exact=True)).to_be_visible()
    edit = page.locator("fieldset.edit").last
    expect(edit.get_by_label("Feature", exact=True)).to_have_value(str(feature))
    expect(edit.get_by_label("Op", exact=True)).to_have_value("set")
    expect(edit.get_by_label("Value", exact=True)).to_have_value(str(round(3 * peak, 1)).removesuffix(".0"))


def test_the_feature_search_page_opens_a_hit(page, server):  # noqa: F811
    _open(page, server, f"#/features?dict={DEFAULT}", "Features")
    page.get_by_label("Search features").fill("lineno")
    found = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features", params={"q": "lineno", "limit": 20},
                         timeout=60).json()
    hits = page.locator(".search-results button.hit")
    expect(hits).to_have_count(len(found["data"]))
    assert [int(h.get_attribute("data-feature")) for h in hits.all()] == [h["feature"] for h in found["data"]]
    hits.first.click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {found['data'][0]['feature']}")).to_be_visible()


# --- the inspector -----------------------------------------------------------------------------------

def test_the_inspectors_highlights_match_inspect(page, server, shots):  # noqa: F811
    text = "Return the number of lines in the file.\nIf it does not exist, raise an error."
    _open(page, server, "#/inspect", "Inspector")
    page.get_by_label("Text").fill(text)
    page.get_by_role("button", name="Inspect").click()
    strongest = requests.post(server + "/v1/inspect", json={"text": text, "dictionary": DEFAULT, "top_k": 10},
                              timeout=60).json()["tokens"]
    spans = page.locator("[data-testid=inspect-tokens] .tok")
    expect(spans).to_have_count(len(strongest))

    def shown():
        return page.evaluate("""() => [...document.querySelectorAll('[data-testid=inspect-tokens] .tok')].map(t => ({
            feature: t.dataset.feature, activation: Number(t.dataset.activation),
            alpha: getComputedStyle(t).backgroundColor}))""")

    on_page = shown()
    assert [int(t["feature"]) for t in on_page] == [t["features"][0]["feature"] for t in strongest]
    assert [t["activation"] for t in on_page] == pytest.approx([t["features"][0]["activation"] for t in strongest])
    darkest = max(range(len(on_page)), key=lambda i: _alpha(on_page[i]["alpha"]))
    assert darkest == max(range(len(strongest)), key=lambda i: strongest[i]["features"][0]["activation"])
    page.screenshot(path=shots("inspector"), full_page=True)

    # shaded by one chosen feature: its activation at every token (0 where it is not active)
    chosen = strongest[2]["features"][0]["feature"]
    page.get_by_label("Feature to shade by").fill(str(chosen))
    page.get_by_role("button", name="Inspect").click()
    expect(page.get_by_role("status").filter(has_text=f"feature {chosen};")).to_be_visible()
    full = requests.post(server + "/v1/inspect", json={"text": text, "dictionary": DEFAULT, "top_k": 64},
                         timeout=60).json()["tokens"]
    expected = [next((f["activation"] for f in t["features"] if f["feature"] == chosen), 0.0) for t in full]
    assert [t["activation"] for t in shown()] == pytest.approx(expected)
    assert any(a == 0 for a in expected) and any(a > 0 for a in expected)

    # by keyboard: into the tokens, three to the right, Enter: that token's features, linking to their pages
    spans.first.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    detail = page.get_by_test_id("token-features")
    expect(detail.locator("a")).to_have_text([f"feature {f['feature']}" for f in full[3]["features"]])
    detail.locator("a").first.click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {full[3]['features'][0]['feature']}")).to_be_visible()


# --- jobs --------------------------------------------------------------------------------------------

def test_an_evaluation_started_from_the_form_shows_its_figures(page, server, shots):  # noqa: F811
    _open(page, server, "#/jobs", "Jobs")
    form = page.get_by_role("form", name="Start an evaluation")
    form.get_by_label("Dictionary").select_option(DEFAULT)
    form.get_by_label("Tokens").fill("1024")
    form.get_by_label("Edits (optional)").fill(f"{DEFAULT}:5:scale:3")
    form.get_by_role("button", name="Start evaluation").click()
    detail = page.get_by_test_id("job-detail")
    expect(detail).to_have_attribute("data-status", "succeeded", timeout=300_000)
    job_id = page.url.rsplit("/", 1)[1]
    record = requests.get(f"{server}/v1/evaluations/{job_id}", timeout=30).json()
    from editing.edits import EditSpec  # the record lists every field, defaults included

    assert [EditSpec(**edit) for edit in record["request"]["edits"]] == [
        EditSpec(dictionary=DEFAULT, feature=5, op="scale", value=3.0, positions="all")]
    result = record["result"]
    for run in ("clean", "spliced", "zero", "edited"):
        ce = result["ce"][run]
        expect(detail.locator(f"tr[data-run={run}] td").first).to_have_text(f"{ce['mean']:.4f} ± {ce['se']:.4f}")
    recovered = result["ce_loss_recovered"]
    expect(detail.get_by_role("row", name=re.compile("CE loss recovered"))).to_contain_text(
        f"{recovered['mean']:.4f} ± {recovered['se']:.4f}")
    page.screenshot(path=shots("jobs"), full_page=True)


def test_the_training_form_sends_target_l0_and_shows_its_errors_at_the_field(page, server):  # noqa: F811
    """Targets go out as ``target_l0`` (the coefficient then starts from the server's default); the
    server's 400 for a target on a topk dictionary appears next to the Target L0 field. No job starts:
    each request the form sends is one the server refuses."""
    _open(page, server, "#/jobs", "Jobs")
    form = page.get_by_role("form", name="Start a training")
    form.get_by_label("Name").fill("ui-target")
    form.get_by_label("Target L0 (relu, jumprelu)").fill("20")
    form.get_by_role("button", name="Start training").click()  # topk (the default) has no target
    message = form.locator("[data-param=target_l0] .field-error")
    expect(message).to_be_visible()
    expect(message).to_contain_text("a topk dictionary's L0 is its k")

    form.get_by_label("Architecture").select_option("relu")
    form.get_by_label("Target L0 (relu, jumprelu)").fill("20, 40")
    form.get_by_label("Tokens").fill("10")  # below the minimum: refused, so nothing trains
    with page.expect_request(lambda r: r.url.endswith("/v1/trainings") and r.method == "POST") as sent:
        form.get_by_role("button", name="Start training").click()
    body = json.loads(sent.value.post_data)
    assert body["target_l0"] == [20, 40] and "l1" not in body and body["architecture"] == "relu"
    expect(form.locator("[data-param=tokens] .field-error")).to_be_visible()
    jobs = requests.get(server + "/v1/trainings", timeout=30).json()
    assert not any(job["request"]["name"] == "ui-target" for job in jobs["data"])


# --- narrow windows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("route, heading", [("#/playground", "Playground"), (f"#/feature/{DEFAULT}/7", f"{DEFAULT} · feature 7"),
                                            ("#/dictionaries", "Dictionaries")])
def test_views_fit_a_narrow_window(page, server, shots, route, heading):  # noqa: F811
    page.set_viewport_size({"width": 390, "height": 844})
    _open(page, server, route, heading)
    page.wait_for_load_state("networkidle")
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"{route} scrolls sideways by {overflow}px at 390px"
    page.screenshot(path=shots(f"narrow-{heading.split(' ')[0].lower()}"), full_page=True)
