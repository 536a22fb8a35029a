// Feature pages: #/feature/DICT/I shows a feature's density and mean activation, its top
// activating contexts with each token shaded by its activation, the logit lens, a button that
// opens the playground with the feature as an edit, previous/next, and a search box.
// #/features (no index) is the search page for a dictionary.

import { cached, loadedDictionaries } from "./api.js";
import { clear, field, fmt, h, pct, select, tokenSpan, uid, viewError } from "./dom.js";
import { featureSearch } from "./search.js";
import { editToText } from "./editspec.js";

function go(hash) {
  window.location.hash = hash;
}

function lensTable(title, entries) {
  return h("section", { class: "lens", "aria-label": title }, h("h4", { text: title }),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "token" }), h("th", { scope: "col", text: "logit" }))),
      h("tbody", {}, entries.map((entry) => h("tr", {},
        h("td", {}, h("code", { text: JSON.stringify(entry.token) })), h("td", { class: "num", text: fmt(entry.value) }))))));
}

// Each context's tokens shaded against the feature's largest activation over all its contexts.
export function contextsView(contexts) {
  const peak = Math.max(0, ...contexts.map((c) => c.max_activation));
  return h("ol", { class: "contexts", "data-testid": "contexts" }, contexts.map((context, c) => h("li", {
    class: "context", "data-max": context.max_activation, "data-context": c,
  }, h("span", { class: "ctx-max num", text: fmt(context.max_activation, 3) }),
  h("span", { class: "ctx-tokens" }, context.tokens.map((token) =>
    tokenSpan(token.token, token.activation, peak > 0 ? token.activation / peak : 0))))));
}

export async function render(root, { segments, params }) {
  let dictionaries;
  try {
    dictionaries = await loadedDictionaries();
  } catch (err) {
    return viewError(root, "Features", err);
  }
  const names = dictionaries.map((d) => d.name);
  const name = segments[1] || params.get("dict") || names[0];
  const info = dictionaries.find((d) => d.name === name);
  const index = segments[2] === undefined ? null : Number(segments[2]);

  // navigation: dictionary, index, previous/next, search
  const dictSelect = select(names, name);
  const indexInput = h("input", { type: "number", min: 0, max: info ? info.d_sae - 1 : undefined, step: 1,
    value: index ?? "", id: uid() });
  const open = () => indexInput.value !== "" && go(`#/feature/${encodeURIComponent(dictSelect.value)}/${indexInput.value}`);
  indexInput.addEventListener("keydown", (e) => e.key === "Enter" && (e.preventDefault(), open()));
  dictSelect.addEventListener("change", () => go(index === null ? `#/features?dict=${encodeURIComponent(dictSelect.value)}`
    : `#/feature/${encodeURIComponent(dictSelect.value)}/0`));
  const prev = h("a", { class: "button secondary", rel: "prev", text: "← Previous" });
  const next = h("a", { class: "button secondary", rel: "next", text: "Next →" });
  if (index !== null && index > 0) prev.href = `#/feature/${encodeURIComponent(name)}/${index - 1}`;
  else prev.setAttribute("aria-disabled", "true");
  if (index !== null && info && index < info.d_sae - 1) next.href = `#/feature/${encodeURIComponent(name)}/${index + 1}`;
  else next.setAttribute("aria-disabled", "true");

  const indexError = h("p", { class: "field-error", role: "alert", hidden: true, id: uid("err") });
  indexInput.setAttribute("aria-describedby", indexError.id);
  const indexField = h("div", { class: "field", "data-param": "feature" }, h("label", { for: indexInput.id, text: "Feature" }),
    h("div", { class: "row" }, indexInput, h("button", { type: "button", class: "secondary", text: "Open", onclick: open })),
    indexError);
  const search = featureSearch({
    dictionary: () => dictSelect.value, label: "Search features", limit: index === null ? 20 : 8,
    placeholder: "e.g. file, lineno, return",
    onPick: (hit) => go(`#/feature/${encodeURIComponent(dictSelect.value)}/${hit.feature}`),
  });
  if (params.get("q")) {
    search.input.value = params.get("q");
    search.run();
  }
  const nav = h("div", { class: "panel feature-nav" },
    h("div", { class: "grid" }, field("Dictionary", dictSelect),
      indexField,
      search.el),
    index === null ? null : h("div", { class: "row" }, prev, next));

  if (index === null) {
    clear(root, h("h2", { text: "Features" }), nav,
      h("p", { class: "hint", text: info ? `${name}: ${info.d_sae} features on ${info.hook}. Type a word to find `
        + "the features whose top contexts or promoted tokens hold it, or open one by index." : "No dictionary is loaded." }),
    );
    return null;
  }

  const body = h("div", { class: "feature-body", "aria-busy": "true" }, h("p", { class: "hint", text: "loading…" }));
  clear(root, h("h2", {}, `${name} · feature ${index}`), nav, body);
  let feature;
  try {
    feature = await cached(`v1/dictionaries/${encodeURIComponent(name)}/features/${index}`);
  } catch (err) {
    // beside the Feature box, which holds what was refused (an index out of range, …)
    indexError.textContent = err.describe ? err.describe() : String(err);
    indexError.hidden = false;
    indexInput.setAttribute("aria-invalid", "true");
    clear(body, h("p", { class: "hint", text: `No feature ${index} to show: see the message beside the Feature box.` }));
    body.removeAttribute("aria-busy");
    return null;
  }
  body.removeAttribute("aria-busy");
  const peak = feature.top_contexts ? Math.max(0, ...feature.top_contexts.map((c) => c.max_activation)) : 0;
  // 3× its recorded maximum, in the calibrated unit when it has one (a raw 3 otherwise)
  const steerEdit = { dictionary: name, feature: index, op: "set", value: 3, positions: "all",
    value_unit: peak > 0 ? "max_activation" : "raw" };
  const steer = h("a", {
    class: "button primary",
    href: `#/playground?edit=${encodeURIComponent(editToText(steerEdit))}`,
    text: "Steer with this feature",
    title: `opens the playground with the edit ${editToText(steerEdit)}`
      + (peak > 0 ? ` (3× its largest activation, ${fmt(peak)})` : ""),
  });
  const inspect = h("a", { class: "button secondary", href: `#/inspect?dict=${encodeURIComponent(name)}&feature=${index}`,
    text: "Shade a text by it" });
  if (feature.statistics === null || feature.density === undefined) {
    clear(body, h("p", { class: "hint", text: feature.note || "no statistics" }), h("div", { class: "row" }, steer, inspect));
    return null;
  }
  const measured = feature.measured_on || {};
  clear(body,
    h("div", { class: "stats" },
      h("div", { class: "stat" }, h("span", { class: "label", text: "Firing density" }),
        h("span", { class: "value", "data-testid": "density", text: pct(feature.density, 3) })),
      h("div", { class: "stat" }, h("span", { class: "label", text: "Mean activation (when firing)" }),
        h("span", { class: "value", "data-testid": "mean-activation", text: fmt(feature.mean_activation) })),
      h("div", { class: "stat" }, h("span", { class: "label", text: "Largest activation" }),
        h("span", { class: "value", text: fmt(peak) })),
      h("div", { class: "stat" }, h("span", { class: "label", text: "Hook" }), h("span", { class: "value small", text: feature.hook }))),
    h("p", { class: "hint", text: measured.tokens ? `measured on ${measured.tokens} tokens of ${measured.corpus}` : "" }),
    h("div", { class: "row" }, steer, inspect),
    h("div", { class: "feature-grid" },
      h("section", { class: "panel", "aria-label": "Top activating contexts" },
        h("h3", { text: "Top activating contexts" }),
        h("p", { class: "hint", text: "Each token is shaded by the feature's activation on it (darkest = the largest "
          + "activation over these contexts); hover a token for its value." }),
        feature.top_contexts.length ? contextsView(feature.top_contexts) : h("p", { text: "It never fired on the measured tokens." })),
      h("section", { class: "panel", "aria-label": "Logit lens" }, h("h3", { text: "Logit lens" }),
        h("p", { class: "hint", text: "The tokens its decoder direction promotes and suppresses through the unembedding." }),
        h("div", { class: "lens-pair" }, lensTable("Promoted", feature.logit_lens.promoted),
          lensTable("Suppressed", feature.logit_lens.suppressed)))));
  return null;
}
