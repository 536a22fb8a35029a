"""The feature pages, the inspector, jobs and every view at a narrow width, driven by a real
headless Chromium against the session's app on loopback.

Each test checks what a person sees against the API: the feature page's statistics, shading and
logit lens against the feature's statistics, its search box against feature search, the
inspector against POST /v1/inspect, an evaluation started from its form and followed live
against its record. Screenshots go to .test-home/screenshots/.
"""

import json
import re

import pytest
import requests

from tests.service.browser import browser, open_view, page, shots  # noqa: F401 - fixtures

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips these tests (or fails them, in CI)
    expect = None

DEFAULT = "pythia-tiny-l2"
EARLIER = "random-l1"


def _alpha(color: str) -> float:
    """The alpha of a computed CSS colour: rgb(...) is opaque, rgba(r, g, b, a)."""
    parts = re.findall(r"[\d.]+", color)
    return float(parts[3]) if len(parts) == 4 else 1.0


def _open(page, server, route, heading):  # noqa: F811
    open_view(page, f"{server}/{route}", heading)


# --- feature pages -----------------------------------------------------------------------------------

def test_the_feature_page_shades_top_contexts_by_activation(page, server, shots):  # noqa: F811
    feature = 7
    stats = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features/{feature}", timeout=60).json()
    _open(page, server, f"#/feature/{DEFAULT}/{feature}", f"{DEFAULT} · feature {feature}")
    expect(page.get_by_test_id("density")).to_have_text(f"{100 * stats['density']:.3f}%")
    assert float(page.get_by_test_id("mean-activation").text_content()) == pytest.approx(stats["mean_activation"], abs=5e-4)
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
    suppressed = lens.locator("section[aria-label=Suppressed] tbody tr")
    assert suppressed.locator("td:first-child").all_text_contents() == [
        json.dumps(p["token"], ensure_ascii=False) for p in stats["logit_lens"]["suppressed"]]
    assert [float(v) for v in suppressed.locator("td:last-child").all_text_contents()] == pytest.approx(
        [p["value"] for p in stats["logit_lens"]["suppressed"]], abs=5e-4)
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
    expect(edit.get_by_label("Value", exact=True)).to_have_value("3")  # 3 × its largest activation:
    expect(edit.get_by_label("Unit", exact=True)).to_have_value("max_activation")
    expect(edit.locator(".feature-info")).to_contain_text(f"= {float(f'{3 * peak:.3f}'):g} raw")


def test_the_search_box_on_a_feature_page_opens_a_hit(page, server):  # noqa: F811
    _open(page, server, f"#/feature/{DEFAULT}/7", f"{DEFAULT} · feature 7")
    page.get_by_label("Search features").fill("lineno")
    found = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features", params={"q": "lineno", "limit": 8},
                         timeout=60).json()["data"]
    hits = page.locator(".search-results button.hit")
    expect(hits).to_have_count(len(found))
    assert [int(h.get_attribute("data-feature")) for h in hits.all()] == [h["feature"] for h in found]
    hits.nth(1).click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {found[1]['feature']}")).to_be_visible()


def test_a_feature_that_cannot_load_says_why_beside_the_feature_box(page, server):  # noqa: F811
    error = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features/99999", timeout=60).json()["error"]
    _open(page, server, f"#/feature/{DEFAULT}/99999", f"{DEFAULT} · feature 99999")
    box = page.get_by_label("Feature", exact=True)
    slot = page.locator("[data-param=feature] .field-error")
    expect(slot).to_have_text(f"Error 404: {error['message']} (param: {error['param']})")
    expect(box).to_have_attribute("aria-invalid", "true")
    assert slot.get_attribute("id") == box.get_attribute("aria-describedby")


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

def test_an_evaluation_started_from_the_form_shows_its_progress_and_figures(page, server, shots):  # noqa: F811
    _open(page, server, "#/jobs", "Jobs")
    # every state the job's panel shows: (status, progress bar, the progress line's text)
    page.evaluate("""() => {
        window.__states = [];
        const detail = document.querySelector('[data-testid=job-detail]');
        new MutationObserver(() => {
            const bar = detail.querySelector('progress');
            window.__states.push([detail.dataset.status, bar ? bar.value : null,
                                  detail.querySelector('[role=status]')?.textContent ?? '']);
        }).observe(detail, {subtree: true, childList: true, attributes: true});
    }""")
    form = page.get_by_role("form", name="Start an evaluation")
    form.get_by_label("Dictionary").select_option(DEFAULT)
    form.get_by_label("Tokens").fill("16384")  # 128 windows, reported a batch of 8 at a time
    form.get_by_label("Edits (optional)").fill(f"{DEFAULT}:5:scale:3, {DEFAULT}:403:add:1,unit=max,when={DEFAULT}:680>1")
    form.get_by_role("button", name="Start evaluation").click()
    detail = page.get_by_test_id("job-detail")
    expect(detail).to_have_attribute("data-status", "succeeded", timeout=300_000)
    states = page.evaluate("window.__states")
    done = next(i for i, (status, _, _) in enumerate(states) if status == "succeeded")
    live = [(progress, text) for status, progress, text in states[:done] if status == "running" and 0 < progress < 1]
    assert live, f"no running state with partial progress before it succeeded: {states}"
    assert all(re.search(rf"{int(100 * progress + 0.5)}% · \d+/128 windows", text) for progress, text in live), live
    job_id = page.url.rsplit("/", 1)[1]
    record = requests.get(f"{server}/v1/evaluations/{job_id}", timeout=30).json()
    from editing.edits import EditSpec  # the record lists every field, defaults included

    assert [EditSpec(**edit) for edit in record["request"]["edits"]] == [
        EditSpec(dictionary=DEFAULT, feature=5, op="scale", value=3.0, positions="all"),
        EditSpec(dictionary=DEFAULT, feature=403, op="add", value=1.0, value_unit="max_activation",
                 when={"dictionary": DEFAULT, "feature": 680, "above": 1.0})]
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

NARROW = [  # every view, filled in where it has results to show
    ("playground", "#/playground?prompt=Return%20the%20number%20of&max_tokens=8"
                   f"&edit={DEFAULT}:7:set:3@all,unit=max,when={DEFAULT}:680%3E1&run=1", "Playground", "[data-testid=steered][data-state=done]"),
    ("feature", f"#/feature/{DEFAULT}/7", f"{DEFAULT} · feature 7", "[data-testid=contexts]"),
    ("features", f"#/features?dict={DEFAULT}&q=lineno", "Features", ".search-results button.hit"),
    ("inspector", f"#/inspect?dict={DEFAULT}&text=Open%20the%20file%20and%20read%20the%20first%20line.&span=1:3",
     "Inspector", "[data-testid=span-features]"),
    ("contrast", f"#/contrast?dict={DEFAULT}&a=The%20argument%20is%20a%20string.%0APass%20the%20argument."
                 "&b=The%20value%20is%20a%20string.%0APass%20the%20value.", "Contrast", "[data-testid=contrast-table]"),
    ("compare", f"#/compare?a={DEFAULT}&b={EARLIER}&threshold=0.3", "Compare dictionaries", "[data-testid=pairs]"),
    ("dictionaries", "#/dictionaries", "Dictionaries", "table.dictionaries"),
    ("jobs", "#/jobs", "Jobs", "[data-testid=jobs] table, [data-testid=jobs] p"),
]


@pytest.mark.parametrize("name, route, heading, ready", NARROW, ids=[view[0] for view in NARROW])
def test_views_fit_a_narrow_window(page, server, shots, name, route, heading, ready):  # noqa: F811
    page.set_viewport_size({"width": 390, "height": 844})
    _open(page, server, route, heading)
    expect(page.locator(ready).first).to_be_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"{route} scrolls sideways by {overflow}px at 390px"
    page.screenshot(path=shots(f"narrow-{name}"), full_page=True)
