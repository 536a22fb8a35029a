// The inspector: a text's tokens shaded by a chosen feature or by each token's strongest
// feature (POST /v1/inspect); picking a token lists its top features, each linking to its page.
// Selecting a span of tokens (shift+click, shift+arrows, or a drag) searches by example
// (POST /v1/search): the features most active on that span, relative to each one's usual maximum.

import { api, loadedDictionaries } from "./api.js";
import { busy, clear, clearErrors, field, fmt, formError, h, rovingTokens, select, showError, tokenSpan, uid, viewError } from "./dom.js";

const DEFAULT_TEXT = "Return the number of lines in the file, or raise an exception if it does not exist.";
const STRONGEST_K = 10;
const FEATURE_K = 64; // the most /v1/inspect gives; a chosen feature outside a token's top 64 is "below"
const SEARCH_K = 10;

export async function render(root, { params }) {
  let dictionaries;
  try {
    dictionaries = await loadedDictionaries();
  } catch (err) {
    return viewError(root, "Inspector", err);
  }
  const names = dictionaries.map((d) => d.name);
  const dictionary = select(names, params.get("dict") || names[0]);
  const text = h("textarea", { rows: 4, value: params.get("text") ?? DEFAULT_TEXT, spellcheck: "false" });
  const byStrongest = h("input", { type: "radio", name: "shade", value: "strongest", id: uid(),
    checked: !params.has("feature") });
  const byFeature = h("input", { type: "radio", name: "shade", value: "feature", id: uid(), checked: params.has("feature") });
  const featureIndex = h("input", { type: "number", min: 0, step: 1, value: params.get("feature") ?? "", id: uid(),
    "aria-label": "Feature to shade by" });
  featureIndex.addEventListener("focus", () => (byFeature.checked = true));
  const button = h("button", { type: "submit", class: "primary", text: "Inspect" });
  const shadeField = h("fieldset", { class: "field shade", "data-param": "feature" },
    h("legend", { text: "Shade tokens by" }),
    h("div", { class: "row" }, byStrongest, h("label", { for: byStrongest.id, text: "each token's strongest feature" })),
    h("div", { class: "row" }, byFeature, h("label", { for: byFeature.id, text: "feature" }), featureIndex),
    h("p", { class: "field-error", role: "alert", hidden: true }));
  const form = h("form", { class: "panel", novalidate: true }, formError(),
    h("div", { class: "grid" }, field("Dictionary", dictionary, { param: "dictionary" }), shadeField),
    field("Text", text, { param: "text", className: "wide" }), h("div", { class: "actions" }, button));
  const legend = h("p", { class: "hint", role: "status" });
  const tokensView = h("div", { class: "inspect-tokens", "data-testid": "inspect-tokens" });
  const detail = h("aside", { class: "panel token-detail", "aria-label": "Selected token", "data-testid": "token-detail" },
    h("p", { class: "hint", text: "Pick a token (click, or arrow keys and Enter) to see its top features; select a span "
      + "(shift+click, shift+arrow keys, or drag across tokens) to find the features most active on it." }));
  clear(root, h("h2", { text: "Inspector" }), form,
    h("div", { class: "inspect-layout" }, h("section", { class: "panel" }, legend, tokensView), detail));

  function showDetail(token, name) {
    clear(detail, h("h3", {}, "Token ", h("code", { text: JSON.stringify(token.token) })),
      h("p", { class: "hint", text: `position ${token.position} · ${name}` }),
      token.features.length ? h("ol", { class: "feature-list", "data-testid": "token-features" }, token.features.map((f) => {
        const top = token.features[0].activation || 1;
        return h("li", {}, h("a", { href: `#/feature/${encodeURIComponent(name)}/${f.feature}`, text: `feature ${f.feature}` }),
          " ", h("meter", { min: 0, max: top, value: f.activation, "aria-label": `activation of feature ${f.feature}` }),
          " ", h("span", { class: "num", text: fmt(f.activation) }));
      })) : h("p", { text: "No feature is active on this token." }));
  }

  // Search by example: the features most active on tokens first..last, ranked as the server ranks them.
  let searching = 0;
  async function searchSpan(read, name, first, last) {
    const mine = ++searching;
    const spanText = read.tokens.slice(first, last + 1).map((t) => t.token).join("");
    const search = new URLSearchParams(window.location.hash.split("?")[1] || "");
    search.set("span", `${first}:${last + 1}`);
    history.replaceState(null, "", `#/inspect?${search}`);
    clear(detail, h("h3", {}, "Span ", h("code", { text: JSON.stringify(spanText) })),
      h("p", { class: "hint", role: "status", text: `tokens ${first}–${last} · ${name} · searching…` }));
    detail.setAttribute("aria-busy", "true");
    try {
      const found = await api("POST", "v1/search", { text: read.text, dictionary: name, top_k: SEARCH_K,
        span: { start: first, end: last + 1, unit: "token" } });
      if (mine !== searching) return;
      const relative = found.ranked_by === "relative";
      clear(detail, h("h3", {}, "Span ", h("code", { text: JSON.stringify(found.span.text) })),
        h("p", { class: "hint", role: "status", text: `tokens ${found.span.tokens[0]}–${found.span.tokens[1] - 1} · ${name} · `
          + (relative ? "the features most active here, relative to each one's largest recorded activation"
            : "the features most active here, by activation") }),
        found.note ? h("p", { class: "hint", text: found.note }) : null,
        found.features.length ? h("table", { class: "span-features", "data-testid": "span-features" },
          h("thead", {}, h("tr", {}, ["Feature", relative ? "Of its max" : "Activation", "On"]
            .map((label) => h("th", { scope: "col", text: label })))),
          h("tbody", {}, found.features.map((f) => h("tr", { "data-feature": f.feature },
            h("th", { scope: "row" }, h("a", { href: `#/feature/${encodeURIComponent(name)}/${f.feature}`, text: `#${f.feature}`,
              "aria-label": `feature ${f.feature}` })),
            h("td", { class: "num", title: relative ? `${fmt(f.activation)} of its largest recorded ${fmt(f.typical_max)}` : null },
              relative ? h("meter", { min: 0, max: 1, value: Math.min(1, f.relative), "aria-hidden": "true" }) : null,
              " ", relative ? `${(100 * f.relative).toFixed(1)}%` : fmt(f.activation)),
            h("td", {}, h("code", { text: JSON.stringify(f.token) }), h("span", { class: "hint", text: ` ${fmt(f.activation)}` }))))))
          : h("p", { text: "No feature is active on this span." }));
    } catch (err) {
      if (mine !== searching) return;
      clear(detail, h("h3", { text: "Span" }), h("p", { class: "form-error", role: "alert",
        text: err.describe ? err.describe() : String(err) }));
    } finally {
      if (mine === searching) detail.removeAttribute("aria-busy");
    }
  }

  async function inspect() {
    clearErrors(form);
    const mode = byFeature.checked ? "feature" : "strongest";
    const chosen = featureIndex.value === "" ? null : Number(featureIndex.value);
    const name = dictionary.value;
    const info = dictionaries.find((d) => d.name === name);
    if (mode === "feature" && (chosen === null || !Number.isInteger(chosen) || chosen < 0 || (info && chosen >= info.d_sae))) {
      showError(form, { describe: () => `feature: give a feature index in [0, ${info ? info.d_sae - 1 : "d_sae"}]`, param: "feature" });
      return;
    }
    const search = new URLSearchParams({ dict: name, text: text.value });
    if (mode === "feature") search.set("feature", String(chosen));
    history.replaceState(null, "", `#/inspect?${search}`);
    busy(button, true, "Inspecting…");
    tokensView.setAttribute("aria-busy", "true");
    try {
      const topK = mode === "feature" ? Math.min(FEATURE_K, info?.d_sae ?? FEATURE_K) : STRONGEST_K;
      const sent = text.value;
      const read = await api("POST", "v1/inspect", { text: sent, dictionary: name, top_k: topK });
      const values = read.tokens.map((token) => {
        if (mode === "strongest") return token.features[0] ?? null;
        const entry = token.features.find((f) => f.feature === chosen);
        if (entry) return entry;
        return token.features.length < topK ? { feature: chosen, activation: 0 } : { feature: chosen, activation: null };
      });
      const peak = Math.max(0, ...values.map((v) => v?.activation ?? 0));
      const spans = read.tokens.map((token, i) => {
        const value = values[i];
        const activation = value?.activation ?? 0;
        const title = value === null ? "no active feature"
          : value.activation === null ? `feature ${chosen}: below this token's top ${topK}`
            : `feature ${value.feature}: ${fmt(value.activation)}`;
        const span = tokenSpan(token.token, activation, peak > 0 ? activation / peak : 0,
          { title: `${JSON.stringify(token.token)} · ${title}` });
        span.dataset.feature = value?.feature ?? "";
        if (value && value.activation === null) span.classList.add("unknown");
        if (mode === "strongest" && value) span.dataset.fid = value.feature; // drawn by CSS under the token
        return span;
      });
      clear(tokensView, spans);
      read.text = sent;
      const roving = rovingTokens(tokensView, spans, {
        label: "Tokens of the text: pick one, or select a span with shift",
        onPick: (span, i) => showDetail(read.tokens[i], name),
        onSpan: (first, last) => searchSpan(read, name, first, last),
      });
      legend.textContent = mode === "strongest"
        ? `${read.tokens.length} tokens, each shaded by its strongest ${name} feature (the small number); darkest = ${fmt(peak)}.`
        : `${read.tokens.length} tokens shaded by ${name} feature ${chosen}; darkest = ${fmt(peak)}.`;
      legend.append(" ", h("a", { href: mode === "feature" ? `#/feature/${encodeURIComponent(name)}/${chosen}` : `#/features?dict=${encodeURIComponent(name)}`,
        text: mode === "feature" ? `feature ${chosen}'s page` : "search features" }));
      return { roving, tokens: read.tokens.length };
    } catch (err) {
      showError(form, err);
    } finally {
      busy(button, false);
      tokensView.removeAttribute("aria-busy");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    inspect();
  });
  if (params.has("text") || params.has("feature")) {
    const [first, end] = (params.get("span") || "").split(":").map(Number);
    inspect().then((shown) => {
      if (shown && Number.isInteger(first) && Number.isInteger(end) && 0 <= first && first < end && end <= shown.tokens) {
        shown.roving.span(first, end - 1);
      }
    });
  }
  return null;
}
