// Compare (#/compare): two stored dictionaries → GET /v1/dictionaries/{a}/compare/{b}: MMCS in
// both directions (they differ, so each is labelled with its direction), decoder and encoder side;
// the one-to-one matching (Hungarian, by decoder cosine) with its mean cosines; and the matched
// pairs at or above a threshold, best first, a page at a time, linking to their feature pages.

import { api } from "./api.js";
import { busy, clear, clearErrors, field, formError, h, select, showError, viewError } from "./dom.js";

const PAGE = 20;

function cosine(value) {
  return value === null || value === undefined ? "—" : value.toFixed(4);
}

export async function render(root, { params }) {
  let stored;
  try {
    stored = (await api("GET", "v1/dictionaries?stored=true")).data.filter((d) => !d.error);
  } catch (err) {
    return viewError(root, "Compare", err);
  }
  const names = stored.map((d) => d.name);
  const deployed = new Set(stored.filter((d) => d.deployed).map((d) => d.name));
  const first = select(names, params.get("a") || names[0]);
  const second = select(names, params.get("b") || names[1] || names[0]);
  const threshold = h("input", { type: "number", min: -1, max: 1, step: 0.05, value: params.get("threshold") ?? 0.5 });
  const button = h("button", { type: "submit", class: "primary", text: "Compare" });
  const form = h("form", { class: "panel", "aria-label": "Compare two dictionaries", novalidate: true }, formError(),
    h("div", { class: "grid" }, field("Dictionary A", first, { param: "a" }), field("Dictionary B", second, { param: "b" }),
      field("List pairs with decoder cosine ≥", threshold, { param: "threshold" })),
    h("div", { class: "actions" }, button));
  const results = h("section", { class: "panel compare-results", "aria-label": "Comparison", hidden: true });
  clear(root, h("h2", { text: "Compare dictionaries" }),
    h("p", { class: "hint", text: "How alike are two dictionaries (two sizes of a sweep, two seeds)? MMCS from X to Y is "
      + "the mean over X's features of the best decoder cosine with any of Y's features: it differs by direction, so "
      + "both are shown. Any two stored dictionaries of the same width can be compared." }),
    form, results);

  function featureLink(name, index) {
    return deployed.has(name) ? h("a", { href: `#/feature/${encodeURIComponent(name)}/${index}`, text: `#${index}` })
      : `#${index}`;
  }

  async function load(offset) {
    clearErrors(form);
    const query = new URLSearchParams({ threshold: threshold.value === "" ? "0.5" : threshold.value,
      offset: String(offset), limit: String(PAGE) });
    const a = first.value;
    const b = second.value;
    history.replaceState(null, "", `#/compare?${new URLSearchParams({ a, b, threshold: query.get("threshold"),
      offset: String(offset) })}`);
    busy(button, true, "Comparing…");
    results.setAttribute("aria-busy", "true");
    try {
      show(await api("GET", `v1/dictionaries/${encodeURIComponent(a)}/compare/${encodeURIComponent(b)}?${query}`));
    } catch (err) {
      showError(form, err);
    } finally {
      busy(button, false);
      results.removeAttribute("aria-busy");
    }
  }

  function show(found) {
    const { a, b, mmcs, matching } = found;
    const direction = (from, to) => h("span", {}, h("strong", { text: from.name }), " → ", h("strong", { text: to.name }));
    const mmcsTable = h("table", { class: "mmcs", "data-testid": "mmcs" },
      h("thead", {}, h("tr", {}, ["Direction", "Decoder MMCS", "Encoder MMCS", "Meaning"]
        .map((label) => h("th", { scope: "col", text: label })))),
      h("tbody", {}, [["a_to_b", a, b], ["b_to_a", b, a]].map(([key, from, to]) => h("tr", { "data-direction": key },
        h("th", { scope: "row" }, direction(from, to)),
        h("td", { class: "num", text: cosine(mmcs.decoder[key]) }),
        h("td", { class: "num", text: cosine(mmcs.encoder[key]) }),
        h("td", { class: "hint", text: mmcs.meaning[key] })))));
    const about = (side) => `${side.name}: ${side.architecture}, ${side.d_sae} features, ${side.hook}`;
    const parts = [
      h("h3", {}, direction(a, b)),
      h("p", { class: "hint", text: `A = ${about(a)} · B = ${about(b)}` }),
      found.warnings.map((warning) => h("p", { class: "warning", role: "note", text: warning })),
      h("h4", { text: "MMCS, both ways" }), h("div", { class: "table-wrap" }, mmcsTable),
    ];
    if (!matching) {
      parts.push(h("p", { class: "hint", text: found.note || "no one-to-one matching" }));
    } else {
      const shownTo = matching.offset + matching.data.length;
      const previous = h("button", { type: "button", class: "secondary small", text: "← Previous pairs",
        disabled: matching.offset === 0, onclick: () => load(Math.max(0, matching.offset - matching.limit)) });
      const next = h("button", { type: "button", class: "secondary small", text: "Next pairs →",
        disabled: shownTo >= matching.above_threshold, onclick: () => load(shownTo) });
      parts.push(
        h("h4", { text: "One-to-one matching" }),
        h("p", { "data-testid": "matching", text: `${matching.pairs} pairs matched by ${matching.method}; mean decoder `
          + `cosine ${cosine(matching.mean_decoder_cosine)}, mean encoder cosine ${cosine(matching.mean_encoder_cosine)}.` }),
        h("p", { class: "hint", role: "status", "data-testid": "pairs-status", text: `${matching.above_threshold} pairs at `
          + `decoder cosine ≥ ${matching.threshold}` + (matching.data.length ? `; showing ${matching.offset + 1}–${shownTo}, best first.`
            : ".") }),
        h("div", { class: "table-wrap" }, h("table", { "data-testid": "pairs" },
          h("thead", {}, h("tr", {}, [`${a.name} (A)`, `${b.name} (B)`, "Decoder cosine", "Encoder cosine"]
            .map((label) => h("th", { scope: "col", text: label })))),
          h("tbody", {}, matching.data.map((pair) => h("tr", { "data-a": pair.a, "data-b": pair.b },
            h("td", {}, featureLink(a.name, pair.a)), h("td", {}, featureLink(b.name, pair.b)),
            h("td", { class: "num", text: cosine(pair.decoder_cosine) }),
            h("td", { class: "num", text: cosine(pair.encoder_cosine) })))))),
        h("div", { class: "row" }, previous, next));
    }
    clear(results, parts);
    results.hidden = false;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load(0);
  });
  if (params.has("a") && params.has("b")) load(Number(params.get("offset")) || 0);
  return null;
}
