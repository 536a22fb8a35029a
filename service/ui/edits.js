// One row of the playground's edit list: what is edited (a dictionary feature, found by index
// or by search, or a stored steering vector), the op, the value (a slider and a number box) in
// its unit, the positions, and an optional condition (only where a feature is above or below a
// threshold). Every control carries the API param it sets (edits[i].feature, edits[i].when.feature,
// …) so the server's errors land beside it.

import { cached } from "./api.js";
import { field, fmt, h, pct, select, uid } from "./dom.js";
import { OPS, POSITIONS, UNITS } from "./editspec.js";
import { featureSearch } from "./search.js";

// The slider's span for each op and unit; a value typed beyond it widens the span to reach it.
const RANGES = {
  "scale:raw": [-10, 10, 0.1], "set:raw": [-20, 20, 0.1], "add:raw": [-20, 20, 0.1], "ablate:raw": [0, 0, 0.1],
  "set:max_activation": [-10, 10, 0.1], "add:max_activation": [-10, 10, 0.1],
  "vector:raw": [-20, 20, 0.1], "vector:residual_norm": [-2, 2, 0.01],
};
const UNIT_LABELS = { raw: "raw", max_activation: "× its max activation", residual_norm: "× the residual's norm" };
const OP_LABELS = { ablate: "ablate", scale: "scale", set: "set", add: "add", vector: "vector (steering vector)" };

function vectorSummary(vector) {
  if (!vector) return "";
  if (vector.error) return vector.error;
  const contrast = vector.provenance?.contrast;
  const source = contrast ? `from a contrast on ${contrast.dictionary} (${contrast.sets.a.texts ?? "?"} vs `
    + `${contrast.sets.b.texts ?? "?"} texts)` : vector.provenance?.uploaded ? "uploaded" : "";
  return `at ${vector.hook} · norm ${fmt(vector.norm, 3)}${source ? ` · ${source}` : ""}`;
}

// loadVectors() → the stored steering vectors (GET /v1/vectors), asked only once a row needs them.
export function editRow(edit, { dictionaries, loadVectors, onRemove }) {
  const names = dictionaries.map((d) => d.name);
  const withMissing = (control, name, note) => {
    if (name && ![...control.options].some((o) => o.value === name)) {
      control.append(h("option", { value: name, selected: true, text: `${name} (${note})` }));
    }
    return control;
  };

  // what is edited
  const dictionary = withMissing(select(names, edit.dictionary || names[0]), edit.dictionary, "not loaded");
  const feature = h("input", { type: "number", min: 0, step: 1, inputmode: "numeric", class: "feature-number",
    value: edit.feature ?? "" });
  let vectors = null; // until loaded
  const vector = select(edit.vector ? [edit.vector] : [["", "loading…"]], edit.vector || "");
  const vectorInfo = h("p", { class: "hint vector-info", role: "status" });
  const info = h("p", { class: "hint feature-info", role: "status" });
  const search = featureSearch({
    dictionary: () => dictionary.value,
    label: "…or find it by a word",
    onPick: (hit) => {
      feature.value = hit.feature;
      describe();
      feature.focus();
    },
  });

  // how
  const op = select(OPS.map((o) => [o, OP_LABELS[o]]), edit.op || "set");
  const range = h("input", { type: "range", "aria-label": "Value (slider)", class: "value-range" });
  const number = h("input", { type: "number", step: "any", class: "value-number", value: edit.value ?? 4 });
  const unit = select([...new Set([...UNITS.feature, ...UNITS.vector])], edit.value_unit || "raw"); // narrowed by syncOp
  const positions = select(POSITIONS, edit.positions || "all");

  // where: an optional condition
  const when = edit.when || null;
  const conditional = h("input", { type: "checkbox", checked: Boolean(when) });
  const whenDictionary = withMissing(select(names, when?.dictionary || edit.dictionary || names[0]), when?.dictionary,
    "not loaded");
  const whenFeature = h("input", { type: "number", min: 0, step: 1, inputmode: "numeric", value: when?.feature ?? "" });
  const whenSide = select([["above", "above"], ["below", "below"]],
    when && (when.above === null || when.above === undefined) ? "below" : "above");
  const whenThreshold = h("input", { type: "number", step: "any", value: when ? (when.above ?? when.below) : 0 });

  const legend = h("legend");
  const remove = h("button", { type: "button", class: "ghost small", text: "Remove", onclick: () => onRemove(row) });
  const valueId = uid();
  number.id = valueId;
  const valueField = h("div", { class: "field value" },
    h("label", { for: valueId, text: "Value" }), h("div", { class: "value-pair" }, range, number),
    h("p", { class: "field-error", role: "alert", hidden: true }));
  const fields = {
    dictionary: field("Dictionary", dictionary, { className: "target-feature" }),
    feature: field("Feature", feature, { className: "target-feature" }),
    vector: field("Steering vector", vector, { className: "target-vector" }),
    op: field("Op", op),
    value: valueField,
    value_unit: field("Unit", unit),
    positions: field("Positions", positions),
  };
  search.el.classList.add("target-feature");
  const threshold = field("Threshold", whenThreshold);
  const whenFields = {
    dictionary: field("Condition dictionary", whenDictionary),
    feature: field("Condition feature", whenFeature),
    side: field("Condition is", whenSide),
  };
  const whenBox = h("fieldset", { class: "field when", hidden: !when },
    h("legend", { text: "Only at tokens where" }),
    h("div", { class: "when-grid" }, whenFields.dictionary, whenFields.feature, whenFields.side, threshold),
    h("p", { class: "field-error", role: "alert", hidden: true }));
  const rowError = h("p", { class: "form-error", role: "alert", hidden: true });
  const row = h("fieldset", { class: "edit" }, legend,
    h("div", { class: "edit-grid" }, fields.dictionary, fields.feature, search.el,
      h("div", { class: "target-vector vector-about" }, fields.vector, vectorInfo),
      fields.op, valueField, fields.value_unit, fields.positions),
    info,
    h("div", { class: "row when-toggle" }, h("label", { class: "check" }, conditional,
      " Only where a feature is above or below a threshold (when)"), h("span", { class: "spacer" }), remove),
    whenBox, rowError);

  function unitKey() {
    return `${op.value}:${unit.disabled ? "raw" : unit.value}`;
  }
  // the slider spans the op's usual range, widened (symmetrically) to reach the typed value
  function fitRange() {
    const [low, high, step] = RANGES[unitKey()];
    const value = Number(number.value);
    const reach = number.value !== "" && Number.isFinite(value) ? Math.abs(value) : 0;
    range.step = step;
    range.max = Math.max(high, reach);
    range.min = low < 0 ? -Math.max(-low, reach) : low;
    if (number.value !== "" && Number.isFinite(value)) range.value = value;
  }
  function syncOp() {
    const isVector = op.value === "vector";
    if (isVector && vectors === null) showVectors();
    for (const el of row.querySelectorAll(".target-feature")) el.hidden = isVector;
    for (const el of row.querySelectorAll(".target-vector")) el.hidden = !isVector;
    const units = isVector ? UNITS.vector : ["set", "add"].includes(op.value) ? UNITS.feature : ["raw"];
    const current = unit.value;
    unit.replaceChildren(...units.map((u) => h("option", { value: u, text: UNIT_LABELS[u] })));
    unit.value = units.includes(current) ? current : "raw";
    unit.disabled = units.length === 1;
    fields.value_unit.classList.toggle("disabled", unit.disabled);
    const ablate = op.value === "ablate";
    range.disabled = number.disabled = ablate;
    valueField.classList.toggle("disabled", ablate);
    fitRange();
    describe();
  }
  range.addEventListener("input", () => (number.value = range.value));
  number.addEventListener("input", fitRange);
  op.addEventListener("change", syncOp);
  unit.addEventListener("change", () => { fitRange(); describe(); });
  conditional.addEventListener("change", () => {
    whenBox.hidden = !conditional.checked;
    if (conditional.checked) whenFeature.focus();
  });
  vector.addEventListener("change", () => describeVector());
  whenSide.addEventListener("change", () => row.setIndex(row.index));

  async function showVectors() {
    vectors = [];
    const slot = fields.vector.querySelector(".field-error");
    try {
      vectors = (await loadVectors()).filter((v) => !v.error);
    } catch (err) {
      slot.textContent = err.describe ? err.describe() : String(err);
      slot.hidden = false;
    }
    const chosen = vector.value;
    const names = vectors.map((v) => v.name);
    vector.replaceChildren(...(names.length ? names : [""]).map((name) =>
      h("option", { value: name, text: name || "no stored vectors" })));
    withMissing(vector, chosen, "not stored");
    vector.value = chosen || names[0] || "";
    describeVector();
  }
  function describeVector() {
    vectorInfo.replaceChildren();
    if (vectors !== null && !vectors.length) {
      vectorInfo.append("Save one from a ", h("a", { href: "#/contrast", text: "contrast" }), " (admin).");
      return;
    }
    vectorInfo.textContent = vectorSummary((vectors || []).find((v) => v.name === vector.value));
  }

  let timer = null;
  async function describe() {
    const index = feature.value;
    info.textContent = "";
    if (op.value === "vector" || index === "" || !dictionary.value) return;
    try {
      const stats = await cached(`v1/dictionaries/${encodeURIComponent(dictionary.value)}/features/${index}`);
      if (feature.value !== index || op.value === "vector") return;
      const link = h("a", { href: `#/feature/${encodeURIComponent(dictionary.value)}/${index}`, text: "feature page" });
      if (stats.density === undefined) {
        info.replaceChildren(`${stats.note || "no statistics"} · `, link);
        return;
      }
      const top = stats.top_contexts[0]?.max_activation;
      const promoted = stats.logit_lens.promoted.slice(0, 3).map((p) => JSON.stringify(p.token)).join(" ");
      const scaled = unit.value === "max_activation" && !unit.disabled && number.value !== "" && top
        ? ` (${number.value} × ${fmt(top, 3)} = ${fmt(Number(number.value) * top, 3)} raw)` : "";
      info.replaceChildren(`Feature ${index}: largest activation ${fmt(top, 2)}${scaled} · density ${pct(stats.density)} · `
        + `promotes ${promoted} · `, link);
    } catch (err) {
      info.textContent = err.describe ? err.describe() : String(err);
    }
  }
  feature.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(describe, 300);
  });
  number.addEventListener("change", describe);
  dictionary.addEventListener("change", describe);

  row.read = () => {
    const isVector = op.value === "vector";
    const thresholdValue = whenThreshold.value === "" ? null : Number(whenThreshold.value);
    return {
      dictionary: isVector ? null : dictionary.value,
      feature: isVector || feature.value === "" ? null : Number(feature.value),
      vector: isVector ? vector.value || null : null,
      op: op.value,
      value: op.value === "ablate" || number.value === "" ? null : Number(number.value),
      positions: positions.value,
      value_unit: unit.disabled ? "raw" : unit.value,
      when: conditional.checked ? {
        dictionary: whenDictionary.value, feature: whenFeature.value === "" ? null : Number(whenFeature.value),
        above: whenSide.value === "above" ? thresholdValue : null, below: whenSide.value === "below" ? thresholdValue : null,
      } : null,
    };
  };
  row.setIndex = (i) => {
    row.index = i;
    legend.textContent = `Edit ${i + 1}`;
    remove.setAttribute("aria-label", `Remove edit ${i + 1}`);
    row.dataset.param = `edits[${i}]`;
    for (const [name, el] of Object.entries(fields)) el.dataset.param = `edits[${i}].${name}`;
    whenBox.dataset.param = `edits[${i}].when`;
    whenFields.dictionary.dataset.param = `edits[${i}].when.dictionary`;
    whenFields.feature.dataset.param = `edits[${i}].when.feature`;
    threshold.dataset.param = `edits[${i}].when.${whenSide.value}`;
  };
  row.focusFirst = () => (op.value === "vector" ? vector : feature).focus();
  syncOp();
  return row;
}
