// Contrast (#/contrast): two sets of texts (one a line) and a dictionary → POST /v1/contrast:
// the features that separate the sets, ranked by a standardised effect size (Hedges' g) with
// its standard error, and the two sets' mean activations, each linking to its feature page.
// The difference-of-means residual vector comes back too: an admin can store it (save_vector)
// and open the playground with it as a vector edit.

import { api, loadedDictionaries, session } from "./api.js";
import { busy, clear, clearErrors, field, fmt, formError, h, pct, select, showError, viewError } from "./dom.js";
import { editToText } from "./editspec.js";

const EXAMPLE_A = ["Pass the argument to the function.", "The argument must be a string.",
  "Each argument is checked before the call.", "A keyword argument has a default value."];
const EXAMPLE_B = ["Pass the value to the function.", "The value must be a string.",
  "Each value is checked before the call.", "A keyword value has a default value."];
const VECTOR_VALUE = 4; // the strength the CLI suggests for a saved contrast vector
// the server names a.texts[3], a.texts, a (too few): all of them belong to set A's box
const ALIASES = { a: "a.texts", b: "b.texts" };

function lines(text) {
  return text.split("\n").map((line) => line.trim()).filter(Boolean);
}

export async function render(root, { params }) {
  let dictionaries;
  try {
    dictionaries = await loadedDictionaries();
  } catch (err) {
    return viewError(root, "Contrast", err);
  }
  const names = dictionaries.map((d) => d.name);
  const dictionary = select(names, params.get("dict") || names[0]);
  const setA = h("textarea", { rows: 6, spellcheck: "false", value: params.get("a") ?? EXAMPLE_A.join("\n") });
  const setB = h("textarea", { rows: 6, spellcheck: "false", value: params.get("b") ?? EXAMPLE_B.join("\n") });
  const unit = select([["text", "a text (its mean over tokens)"], ["token", "a token"]], params.get("unit") || "text");
  const direction = select([["both", "either way (|g|)"], ["a", "higher in A"], ["b", "higher in B"]],
    params.get("direction") || "both");
  const topK = h("input", { type: "number", min: 1, max: 200, step: 1, value: params.get("top_k") || 20 });
  const button = h("button", { type: "submit", class: "primary", text: "Contrast" });
  const form = h("form", { class: "panel", "aria-label": "Contrast two sets of texts", novalidate: true }, formError(),
    h("div", { class: "grid" }, field("Dictionary", dictionary, { param: "dictionary" }),
      field("One observation is", unit, { param: "unit" }), field("Rank features", direction, { param: "direction" }),
      field("How many", topK, { param: "top_k" })),
    h("div", { class: "contrast-sets" },
      field("Set A (one text a line)", setA, { param: "a.texts" }),
      field("Set B (one text a line)", setB, { param: "b.texts" })),
    h("div", { class: "actions" }, button));
  const results = h("section", { class: "panel contrast-results", "aria-label": "Contrast results", hidden: true });
  clear(root, h("h2", { text: "Contrast" }),
    h("p", { class: "hint", text: "Which features separate two sets of texts? Each feature's mean activation is "
      + "compared between the sets, ranked by a standardised effect size (Hedges' g) with its standard error. Two "
      + "sets that differ in one word single out the features of that word." }),
    form, results);

  function body() {
    return {
      dictionary: dictionary.value, a: { texts: lines(setA.value) }, b: { texts: lines(setB.value) },
      unit: unit.value, direction: direction.value, top_k: topK.value === "" ? undefined : Number(topK.value),
    };
  }

  async function run() {
    clearErrors(form);
    const sent = body();
    const search = new URLSearchParams({ dict: sent.dictionary, a: setA.value, b: setB.value, unit: sent.unit,
      direction: sent.direction });
    if (sent.top_k !== undefined) search.set("top_k", String(sent.top_k));
    history.replaceState(null, "", `#/contrast?${search}`);
    busy(button, true, "Contrasting…");
    results.setAttribute("aria-busy", "true");
    try {
      show(await api("POST", "v1/contrast", sent), sent);
    } catch (err) {
      showError(form, err, { aliases: ALIASES });
    } finally {
      busy(button, false);
      results.removeAttribute("aria-busy");
    }
  }

  function show(found, sent) {
    const { a, b } = found.sets;
    const name = found.dictionary;
    const rows = found.features.map((f) => h("tr", { "data-feature": f.feature },
      h("th", { scope: "row" }, h("a", { href: `#/feature/${encodeURIComponent(name)}/${f.feature}`, text: `#${f.feature}` })),
      h("td", { class: "num", "data-testid": "effect", text: `${f.effect_size.toFixed(3)} ± ${f.se.toFixed(3)}` }),
      h("td", { class: "num", text: f.z.toFixed(2) }),
      h("td", { class: "num", text: fmt(f.mean_a) }),
      h("td", { class: "num", text: fmt(f.mean_b) }),
      h("td", { class: "num", text: pct(f.active_fraction_a, 0) }),
      h("td", { class: "num", text: pct(f.active_fraction_b, 0) })));
    clear(results,
      h("h3", { text: "Features that separate A from B" }),
      h("p", { class: "hint", "data-testid": "contrast-summary", text: `${name} (${found.hook}): A ${a.texts ?? "?"} texts / `
        + `${a.tokens} tokens, B ${b.texts ?? "?"} texts / ${b.tokens} tokens; one observation a ${found.unit}; `
        + `ranked by ${found.ranked_by}.` }),
      found.unit === "token" ? h("p", { class: "hint", text: "Tokens of one text are not independent, so these "
        + "standard errors are optimistic." }) : null,
      h("div", { class: "table-wrap" }, h("table", { "data-testid": "contrast-table" },
        h("thead", {}, h("tr", {}, ["Feature", "g ± se", "z", "Mean A", "Mean B", "Active A", "Active B"]
          .map((label) => h("th", { scope: "col", text: label })))),
        h("tbody", {}, rows))),
      h("p", { class: "hint", text: `g > 0: higher in A. ${found.effect_size}.` }),
      vectorPanel(found, sent));
    results.hidden = false;
  }

  // The difference-of-means vector: admins store it and steer with it; others see why they cannot.
  function vectorPanel(found, sent) {
    const norm = found.vector ? `norm ${fmt(found.vector.norm, 3)}` : "";
    const panel = h("div", { class: "vector-panel", "data-testid": "vector-panel" },
      h("h4", { text: "Difference-of-means vector" }),
      h("p", { text: `mean(h | A) − mean(h | B) at ${found.hook}, ${norm}: adding it pushes the model's residual `
        + "from B towards A." }));
    if (!session.isAdmin) {
      panel.append(h("p", { class: "hint", text: "Storing it as a steering vector needs an admin key; once stored, "
        + "anyone can steer with it in the playground." }));
      return panel;
    }
    const vectorName = h("input", { type: "text", spellcheck: "false", autocomplete: "off",
      value: `contrast-${sent.dictionary}-${Date.now().toString(36)}`.slice(0, 64) });
    const save = h("button", { type: "submit", class: "primary", text: "Steer with the difference-of-means vector" });
    const saveForm = h("form", { class: "row save-vector", "aria-label": "Save the vector", novalidate: true },
      field("Save it as", vectorName, { param: "save_vector" }), save, formError());
    saveForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(saveForm);
      busy(save, true, "Saving…");
      try {
        // the same contrast again, storing its vector (the server computes it, so it is exactly this one)
        const saved = await api("POST", "v1/contrast", { ...sent, save_vector: vectorName.value.trim(), include_vector: false });
        const edit = { op: "vector", vector: saved.saved_vector.name, value: VECTOR_VALUE, positions: "all" };
        window.location.hash = `#/playground?${new URLSearchParams({ edit: editToText(edit), readout: sent.dictionary })}`;
      } catch (err) {
        showError(saveForm, err);
        busy(save, false);
      }
    });
    panel.append(saveForm);
    return panel;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  if (params.has("a") || params.has("b")) run();
  return null;
}
