"""Find and steer on the page, in a real headless Chromium against the session's app on loopback.

The playground's vector edits, calibrated units and conditions (and the page's edit parser, held
to ``parse_edit``), search by example in the inspector, the Contrast view with its
difference-of-means vector, and the Compare view — each checked against the API's answer to
the same request. Screenshots go to .test-home/screenshots/.
"""

import contextlib
import io
import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.service.browser import browser, column_texts, open_view, page, sent_generations, shots  # noqa: F401
from tests.service.browser import wait_generated

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips these tests (or fails them, in CI)
    expect = None

DEFAULT = "pythia-tiny-l2"
EARLIER = "random-l1"
ARGUMENT = ["Pass the argument to the function.", "The argument must be a string.", "Each argument is checked first.",
            "A keyword argument has a default.", "The first argument is the object.", "Give the argument by name."]
VALUE = [text.replace("argument", "value") for text in ARGUMENT]


def _generate(server, body: dict) -> dict:
    out = requests.post(server + "/v1/generate", json=body, timeout=120)
    assert out.status_code == 200, out.text
    return out.json()


@pytest.fixture()
def vector(server):
    """A steering vector in the store: the argument-vs-value difference of means."""
    name = "ui-argument-vs-value"
    saved = requests.post(server + "/v1/contrast", timeout=120, json={
        "dictionary": DEFAULT, "a": {"texts": ARGUMENT}, "b": {"texts": VALUE}, "save_vector": name})
    assert saved.status_code == 200, saved.text
    yield name
    requests.delete(f"{server}/v1/vectors/{name}", timeout=60)


# --- the edit grammar ----------------------------------------------------------------------------------

EDIT_TEXTS = [
    f"{DEFAULT}:7:set:6", f"{DEFAULT}:7:set:6@prompt", "d:7:ablate", "d:7:ablate@generated", "d:7:scale:-2.5@all",
    "d:7:set:2,unit=max", "d:7:add:1e-1,unit=max_activation", "d:7:set:2,unit=norm", "d:7:scale:2,unit=max",
    "d:7:set:2,unit=raw", "d:7:set:2,when=e:3>0.5", "d:7:set:2@prompt,unit=max,when=e:3<-1", "vector:v1:4",
    "vector:v1:-0.3,unit=norm", "vector:v1:2,unit=max", "vector:v1:2@generated,when=d:368>1", "vector:v1:abc",
    "vector::4", "vector:v1:4:5", "d:7:set", "d:7:ablate:1", "d:x:set:1", "d:7:set:1:2", "d:7", "", "d:7:set:inf",
    "d:7:set:nan", "d:7:set:1e7", "d:7:set:-1e6", "d:7:set:1_000", "d:7:set:1__0", "d:7:set: 2 ", "d:7:set:2,",
    "d:7:set:2,foo=1", "d:7:set:2,when=", "d:7:set:2,when=e:3", "d:7:set:2,when=e:-1>2", "d:7:set:2,when=e: +5_0>2",
    "d:7:set:2,when=e:3>inf", "d:7:set:2,when=e:3>1>2", "d:7:set:2,when=:3>1", "d:7:set:2,when=e:3<1>2",
    "d:7:set:2,when=a:b:3>1", "d:7:set:2@", "d:7:set:2@everywhere", "d:7:set:2@prompt@x", "d:7:fly:2", "d:7:vector:2",
    ":7:set:2", "d:-7:set:2", "d: 7:set:2", "d:7:set:.5", "d:7:set:5.", "d:7:set:+5", "d:007:set:1", "x" * 65 + ":1:ablate",
    "d:7:set:2,unit=max,unit=raw", "d:7:set:2,when=e:3>1,when=e:4<2", "vector:v:1e6", "vector:v:1000001",
    "d:7:scale:-0", "d:7:set:0x10", "d:7:set:1e", "d:7:set:2,unit=MAX", "d:7:set:2,when=e:3>1e-3",
]


def test_the_pages_edit_parser_is_parse_edit(page, server):  # noqa: F811
    """The page reads the CLI's edit form (links, the jobs form) exactly as ``editing.edits.parse_edit``
    does: the same texts accepted, into the same edits, and its own writing read back unchanged."""
    from editing.edits import EditError, parse_edit

    open_view(page, f"{server}/#/playground", "Playground")
    on_page = page.evaluate("""async (texts) => {
        const { parseEdit, editToText } = await import('./ui/editspec.js');
        return texts.map((text) => {
            const { edit, error } = parseEdit(text);
            return edit ? { edit, text: editToText(edit) } : { error };
        });
    }""", EDIT_TEXTS)
    accepted = 0
    for text, shown in zip(EDIT_TEXTS, on_page):
        try:
            expected = parse_edit(text).model_dump()
        except (EditError, ValueError):
            assert "error" in shown, f"{text!r}: parse_edit refuses it, the page read {shown}"
            continue
        assert shown.get("edit") == expected, f"{text!r}: the page read {shown}, parse_edit {expected}"
        assert parse_edit(shown["text"]).model_dump() == expected, f"{text!r} written back as {shown['text']!r}"
        accepted += 1
    assert 0 < accepted < len(EDIT_TEXTS)


# --- vector edits, calibrated units and conditions in the playground ------------------------------------

def test_vector_unit_and_condition_edits_from_the_playground(page, browser, server, vector, shots):  # noqa: F811
    prompt = "If the value is not given, return the"
    open_view(page, f"{server}/#/playground", "Playground")
    sent = sent_generations(page)
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Max tokens").fill("16")
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("button", name="+ Add an edit").click()
    edit = page.locator("fieldset.edit").last
    edit.get_by_label("Op", exact=True).select_option("vector")
    expect(edit.get_by_label("Dictionary", exact=True)).to_be_hidden()
    edit.get_by_label("Steering vector").select_option(vector)
    expect(edit.locator(".vector-info")).to_contain_text("from a contrast on " + DEFAULT)
    edit.get_by_label("Value", exact=True).fill("0.8")
    edit.get_by_label("Unit", exact=True).select_option("residual_norm")
    edit.get_by_label("Only where a feature is above or below a threshold").check()
    edit.get_by_label("Condition dictionary").select_option(DEFAULT)
    edit.get_by_label("Condition feature").fill("680")
    edit.get_by_label("Condition is").select_option("above")
    edit.get_by_label("Threshold", exact=True).fill("1")
    page.get_by_role("button", name="+ Add another edit").click()
    edit = page.locator("fieldset.edit").last
    edit.get_by_label("Feature", exact=True).fill("403")
    edit.get_by_label("Op", exact=True).select_option("set")
    edit.get_by_label("Value", exact=True).fill("2")
    edit.get_by_label("Unit", exact=True).select_option("max_activation")
    edit.get_by_label("Positions", exact=True).select_option("generated")
    page.get_by_role("button", name="Generate").click()
    wait_generated(page)

    edits = [{"op": "vector", "vector": vector, "value": 0.8, "positions": "all", "value_unit": "residual_norm",
              "when": {"dictionary": DEFAULT, "feature": 680, "above": 1}},
             {"dictionary": DEFAULT, "feature": 403, "op": "set", "value": 2, "positions": "generated",
              "value_unit": "max_activation"}]
    body = {"prompt": prompt, "model": "pythia-tiny", "max_new_tokens": 16, "temperature": 0, "top_p": 1,
            "edits": edits, "include_baseline": True}
    out = _generate(server, body)
    assert column_texts(page) == {"steered": out["text"], "baseline": out["baseline"]["text"]}
    assert out["text"] != out["baseline"]["text"]
    assert next(b for b in sent if b["edits"])["edits"] == edits  # what the steered stream asked for

    # the report: where the condition held, what the vector added, the raw value 2 × max resolved to
    report = page.get_by_role("region", name="Edit report")
    [vectors] = [entry for entry in out["edit_report"] if entry["dictionary"] is None]
    [added] = vectors["vectors"]
    row = report.locator(".report-entry[data-dictionary=''] tbody tr")
    expect(row).to_contain_text(f"{added['fired_positions']} of {added['eligible_positions']} positions")
    assert float(row.locator("td").nth(3).text_content()) == pytest.approx(added["mean_added_norm"], abs=1e-3)
    [features] = [entry for entry in out["edit_report"] if entry["dictionary"] == DEFAULT]
    [resolved] = features["features"][0]["resolved_values"]
    cells = report.locator(f".report-entry[data-dictionary='{DEFAULT}'] tbody tr").first.locator("td")
    assert float(cells.last.text_content()) == pytest.approx(resolved["raw_value"], abs=1e-3)
    page.screenshot(path=shots("playground-vector"), full_page=True)

    # the link holds the edits in the CLI's form; parse_edit reads them as the edits sent
    from editing.edits import EditSpec, parse_edit

    link = page.url
    texts = parse_qs(urlsplit(link).fragment.split("?", 1)[1])["edit"]
    assert texts == [f"vector:{vector}:0.8@all,unit=norm,when={DEFAULT}:680>1", f"{DEFAULT}:403:set:2@generated,unit=max"]
    assert [parse_edit(text) for text in texts] == [EditSpec(**e) for e in edits]
    # "Copy as curl" and "Copy as Python" carry them
    page.get_by_text("The same request as curl and Python").click()
    curl = page.get_by_test_id("curl").text_content()
    assert json.loads(curl.split(" -d '", 1)[1].rstrip("'").replace("'\\''", "'")) == body
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(page.get_by_test_id("python").text_content(), "playground-snippet", "exec"), namespace)
    assert namespace["out"]["text"] == out["text"] and namespace["out"]["edit_report"] == out["edit_report"]

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        other = context.new_page()
        again = sent_generations(other)
        other.goto(link)
        wait_generated(other)
        assert column_texts(other) == column_texts(page)
        assert sorted(again, key=json.dumps) == sorted(sent, key=json.dumps)
        restored = other.locator("fieldset.edit").first
        expect(restored.get_by_label("Op", exact=True)).to_have_value("vector")
        expect(restored.get_by_label("Steering vector")).to_have_value(vector)
        expect(restored.get_by_label("Unit", exact=True)).to_have_value("residual_norm")
        expect(restored.get_by_label("Condition feature")).to_have_value("680")
        expect(other.locator("fieldset.edit").last.get_by_label("Unit", exact=True)).to_have_value("max_activation")
    finally:
        context.close()


# --- search by example ---------------------------------------------------------------------------------

def test_search_by_example_in_the_inspector(page, server, shots):  # noqa: F811
    text = "Open the file and read the first line of it."
    open_view(page, f"{server}/#/inspect", "Inspector")
    page.get_by_label("Text").fill(text)
    page.get_by_role("button", name="Inspect").click()
    tokens = page.locator("[data-testid=inspect-tokens] .tok")
    expect(tokens).to_have_count(len(requests.post(server + "/v1/inspect", json={"text": text, "dictionary": DEFAULT},
                                                   timeout=60).json()["tokens"]))
    results = page.get_by_test_id("span-features")

    def expect_span(first: int, last: int) -> dict:
        found = requests.post(server + "/v1/search", timeout=60, json={
            "text": text, "dictionary": DEFAULT, "top_k": 10, "span": {"start": first, "end": last + 1, "unit": "token"}}).json()
        rows = results.locator("tbody tr")
        expect(rows).to_have_count(len(found["features"]))
        expect(page.get_by_role("heading", name=f"Span {json.dumps(found['span']['text'])}")).to_be_visible()
        assert [int(r.get_attribute("data-feature")) for r in rows.all()] == [f["feature"] for f in found["features"]]
        assert [c.strip() for c in rows.locator("td.num").all_text_contents()] == [
            f"{100 * f['relative']:.1f}%" for f in found["features"]]
        selected = page.locator("[data-testid=inspect-tokens] .tok[aria-selected=true]")
        assert [int(t.get_attribute("data-index")) for t in selected.all()] == list(range(first, last + 1))
        return found

    # shift+click: from the picked token to the clicked one
    tokens.nth(1).click()
    tokens.nth(3).click(modifiers=["Shift"])
    found = expect_span(1, 3)
    page.screenshot(path=shots("inspector-span"), full_page=True)
    # shift+arrows from a picked token, by keyboard alone
    tokens.nth(5).focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("Shift+ArrowRight")
    expect_span(5, 7)
    # a drag across tokens
    tokens.nth(2).hover()
    page.mouse.down()
    tokens.nth(4).hover()
    page.mouse.up()
    expect_span(2, 4)
    # the span is in the link: reloading shows it again
    assert "span=2%3A5" in page.url or "span=2:5" in page.url
    page.reload()
    expect_span(2, 4)
    # each result links to its feature page
    found = expect_span(2, 4)
    results.get_by_role("link", name=f"feature {found['features'][0]['feature']}").click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {found['features'][0]['feature']}")).to_be_visible()


# --- contrast --------------------------------------------------------------------------------------------

def test_the_contrast_view_ranks_features_and_steers_with_its_vector(page, server, shots):  # noqa: F811
    open_view(page, f"{server}/#/contrast", "Contrast")
    form = page.get_by_role("form", name="Contrast two sets of texts")
    form.get_by_label("Dictionary").select_option(DEFAULT)
    form.get_by_label("Set A (one text a line)").fill("\n".join(ARGUMENT))
    form.get_by_label("Set B (one text a line)").fill("\n".join(VALUE))
    form.get_by_label("Rank features").select_option("a")
    form.get_by_label("How many").fill("8")
    form.get_by_role("button", name="Contrast").click()
    body = {"dictionary": DEFAULT, "a": {"texts": ARGUMENT}, "b": {"texts": VALUE}, "unit": "text", "direction": "a",
            "top_k": 8}
    found = requests.post(server + "/v1/contrast", json=body, timeout=120).json()
    rows = page.get_by_test_id("contrast-table").locator("tbody tr")
    expect(rows).to_have_count(len(found["features"]))
    assert [int(r.get_attribute("data-feature")) for r in rows.all()] == [f["feature"] for f in found["features"]]
    for row, feature in zip(rows.all(), found["features"]):
        cells = row.locator("td").all_text_contents()
        assert cells[0] == f"{feature['effect_size']:.3f} ± {feature['se']:.3f}"
        assert [float(cells[2]), float(cells[3])] == pytest.approx([feature["mean_a"], feature["mean_b"]], abs=5e-4)
    sets = found["sets"]
    expect(page.get_by_test_id("contrast-summary")).to_contain_text(
        f"A {sets['a']['texts']} texts / {sets['a']['tokens']} tokens, B {sets['b']['texts']} texts / {sets['b']['tokens']} tokens")
    norm = float(f"{found['vector']['norm']:.3f}")
    expect(page.get_by_test_id("vector-panel")).to_contain_text(f"norm {norm:g}")
    page.screenshot(path=shots("contrast"), full_page=True)
    rows.first.get_by_role("link").click()
    expect(page.get_by_role("heading", name=f"{DEFAULT} · feature {found['features'][0]['feature']}")).to_be_visible()
    page.go_back()
    expect(page.get_by_test_id("contrast-table").locator("tbody tr")).to_have_count(len(found["features"]))

    # an admin (this server is open) stores the vector and steers with it
    name = "ui-contrast-vector"
    try:
        page.get_by_label("Save it as").fill(name)
        page.get_by_role("button", name="Steer with the difference-of-means vector").click()
        expect(page.get_by_role("heading", name="Playground", exact=True)).to_be_visible()
        stored = requests.get(f"{server}/v1/vectors/{name}", timeout=60).json()
        assert stored["norm"] == pytest.approx(found["vector"]["norm"], rel=1e-5)
        assert stored["values"] == pytest.approx(found["vector"]["values"], abs=1e-5)
        assert stored["provenance"]["contrast"]["dictionary"] == DEFAULT
        edit = page.locator("fieldset.edit").last
        expect(edit.get_by_label("Op", exact=True)).to_have_value("vector")
        expect(edit.get_by_label("Steering vector")).to_have_value(name)
        value = float(edit.get_by_label("Value", exact=True).input_value())
        page.get_by_label("Prompt").fill("Pass the")
        page.get_by_label("Max tokens").fill("8")
        page.get_by_label("Temperature").fill("0")
        page.get_by_role("button", name="Generate").click()
        wait_generated(page)
        out = _generate(server, {"prompt": "Pass the", "max_new_tokens": 8, "temperature": 0, "include_baseline": True,
                                 "edits": [{"op": "vector", "vector": name, "value": value}]})
        assert column_texts(page) == {"steered": out["text"], "baseline": out["baseline"]["text"]}
    finally:
        requests.delete(f"{server}/v1/vectors/{name}", timeout=60)


def test_a_contrast_refused_shows_why_beside_the_set(page, server):  # noqa: F811
    open_view(page, f"{server}/#/contrast", "Contrast")
    form = page.get_by_role("form", name="Contrast two sets of texts")
    form.get_by_label("Set A (one text a line)").fill(ARGUMENT[0])  # one text: too few to compare
    form.get_by_label("Set B (one text a line)").fill("\n".join(VALUE))
    form.get_by_role("button", name="Contrast").click()
    error = requests.post(server + "/v1/contrast", timeout=60, json={
        "dictionary": DEFAULT, "a": {"texts": ARGUMENT[:1]}, "b": {"texts": VALUE}, "unit": "text", "direction": "both",
        "top_k": 20}).json()["error"]
    slot = form.locator('[data-param="a.texts"] .field-error')
    expect(slot).to_have_text(f"Error 400: {error['message']} (param: {error['param']})")
    expect(form.get_by_label("Set A (one text a line)")).to_have_attribute("aria-invalid", "true")


# --- compare -------------------------------------------------------------------------------------------

def test_the_compare_view_shows_mmcs_both_ways_and_pages_the_pairs(page, server, shots):  # noqa: F811
    open_view(page, f"{server}/#/compare", "Compare dictionaries")
    form = page.get_by_role("form", name="Compare two dictionaries")
    form.get_by_label("Dictionary A").select_option(DEFAULT)
    form.get_by_label("Dictionary B").select_option(EARLIER)
    form.get_by_label("List pairs with decoder cosine ≥").fill("0.2")
    form.get_by_role("button", name="Compare").click()

    def compared(offset):
        return requests.get(f"{server}/v1/dictionaries/{DEFAULT}/compare/{EARLIER}", timeout=120,
                            params={"threshold": 0.2, "offset": offset, "limit": 20}).json()

    found = compared(0)
    mmcs = page.get_by_test_id("mmcs")
    for key, direction in (("a_to_b", f"{DEFAULT} → {EARLIER}"), ("b_to_a", f"{EARLIER} → {DEFAULT}")):
        row = mmcs.locator(f"tr[data-direction={key}]")
        expect(row.locator("th")).to_have_text(direction)
        expect(row.locator("td")).to_have_text([f"{found['mmcs']['decoder'][key]:.4f}", f"{found['mmcs']['encoder'][key]:.4f}",
                                                found["mmcs"]["meaning"][key]])
    assert found["mmcs"]["decoder"]["a_to_b"] != found["mmcs"]["decoder"]["b_to_a"]  # they do differ
    matching = found["matching"]
    expect(page.get_by_test_id("matching")).to_contain_text(
        f"{matching['pairs']} pairs matched by {matching['method']}; mean decoder cosine "
        f"{matching['mean_decoder_cosine']:.4f}, mean encoder cosine {matching['mean_encoder_cosine']:.4f}")
    expect(page.get_by_text(found["warnings"][0])).to_be_visible()

    def expect_pairs(answer):
        rows = page.get_by_test_id("pairs").locator("tbody tr")
        expect(rows).to_have_count(len(answer["matching"]["data"]))
        expect(page.get_by_test_id("pairs-status")).to_contain_text(
            f"{answer['matching']['above_threshold']} pairs at decoder cosine ≥ 0.2; showing "
            f"{answer['matching']['offset'] + 1}–{answer['matching']['offset'] + len(answer['matching']['data'])}")
        shown = [r.locator("td").all_text_contents() for r in rows.all()]
        assert shown == [[f"#{p['a']}", f"#{p['b']}", f"{p['decoder_cosine']:.4f}", f"{p['encoder_cosine']:.4f}"]
                         for p in answer["matching"]["data"]]

    expect_pairs(found)
    page.screenshot(path=shots("compare"), full_page=True)
    assert found["matching"]["above_threshold"] > 20
    page.get_by_role("button", name="Next pairs →").click()
    expect_pairs(compared(20))
    page.get_by_role("button", name="← Previous pairs").click()
    expect_pairs(found)
    first = found["matching"]["data"][0]
    page.get_by_test_id("pairs").locator("tbody tr").first.get_by_role("link", name=f"#{first['b']}").click()
    expect(page.get_by_role("heading", name=f"{EARLIER} · feature {first['b']}")).to_be_visible()
    assert re.search(r"#/feature/random-l1/\d+$", page.url)
