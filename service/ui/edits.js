// One row of the playground's edit list: dictionary, feature (by index or by search), op,
// value (slider and number box), positions. Every control carries the API param it sets
// (edits[i].feature, …) so the server's errors land beside it.

import { cached } from "./api.js";
import { field, fmt, h, pct, select, uid } from "./dom.js";
import { featureSearch } from "./search.js";
import { OPS, POSITIONS } from "./share.js";

const RANGES = { scale: [-10, 10], set: [-20, 20], add: [-20, 20], ablate: [0, 0] };

export function editRow(edit, { dictionaries, onRemove }) {
  const names = dictionaries.map((d) => d.name);
  const dictionary = select(names, edit.dictionary || names[0]);
  if (edit.dictionary && !names.includes(edit.dictionary)) {
    dictionary.append(h("option", { value: edit.dictionary, selected: true, text: `${edit.dictionary} (not loaded)` }));
  }
  const feature = h("input", { type: "number", min: 0, step: 1, inputmode: "numeric", class: "feature-number",
    value: edit.feature ?? "" });
  const info = h("p", { class: "hint feature-info", role: "status" });
  const op = select(OPS, edit.op || "set");
  const range = h("input", { type: "range", step: 0.1, "aria-label": "Value (slider)", class: "value-range" });
  const number = h("input", { type: "number", step: "any", class: "value-number", value: edit.value ?? 4 });
  const positions = select(POSITIONS, edit.positions || "all");
  const legend = h("legend");
  const remove = h("button", { type: "button", class: "ghost small", text: "Remove", onclick: () => onRemove(row) });

  const search = featureSearch({
    dictionary: () => dictionary.value,
    label: "…or find it by a word",
    onPick: (hit) => {
      feature.value = hit.feature;
      describe();
      feature.focus();
    },
  });

  const valueId = uid();
  number.id = valueId;
  const valueField = h("div", { class: "field value" },
    h("label", { for: valueId, text: "Value" }), h("div", { class: "value-pair" }, range, number),
    h("p", { class: "field-error", role: "alert", hidden: true }));

  const fields = {
    dictionary: field("Dictionary", dictionary),
    feature: field("Feature", feature),
    op: field("Op", op),
    value: valueField,
    positions: field("Positions", positions),
  };
  const rowError = h("p", { class: "form-error", role: "alert", hidden: true });
  const row = h("fieldset", { class: "edit" }, legend,
    h("div", { class: "edit-grid" }, fields.dictionary, fields.feature, search.el, fields.op, valueField,
      fields.positions, h("div", { class: "edit-actions" }, remove)), info, rowError);

  function syncOp() {
    const [low, high] = RANGES[op.value];
    range.min = low;
    range.max = high;
    const ablate = op.value === "ablate";
    range.disabled = number.disabled = ablate;
    valueField.classList.toggle("disabled", ablate);
    range.value = number.value;
  }
  range.addEventListener("input", () => (number.value = range.value));
  number.addEventListener("input", () => (range.value = number.value));
  op.addEventListener("change", syncOp);

  let timer = null;
  async function describe() {
    const index = feature.value;
    info.textContent = "";
    if (index === "" || !dictionary.value) return;
    try {
      const stats = await cached(`v1/dictionaries/${encodeURIComponent(dictionary.value)}/features/${index}`);
      if (feature.value !== index) return;
      const link = h("a", { href: `#/feature/${encodeURIComponent(dictionary.value)}/${index}`, text: "feature page" });
      if (stats.density === undefined) {
        info.replaceChildren(`${stats.note || "no statistics"} · `, link);
        return;
      }
      const top = stats.top_contexts[0]?.max_activation;
      const promoted = stats.logit_lens.promoted.slice(0, 3).map((p) => JSON.stringify(p.token)).join(" ");
      info.replaceChildren(`Feature ${index}: largest activation ${fmt(top, 2)} · density ${pct(stats.density)} · `
        + `promotes ${promoted} · `, link);
    } catch (err) {
      info.textContent = err.describe ? err.describe() : String(err);
    }
  }
  feature.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(describe, 300);
  });
  dictionary.addEventListener("change", describe);

  row.read = () => ({
    dictionary: dictionary.value,
    feature: feature.value === "" ? null : Number(feature.value),
    op: op.value,
    value: op.value === "ablate" ? null : number.value === "" ? null : Number(number.value),
    positions: positions.value,
  });
  row.setIndex = (i) => {
    legend.textContent = `Edit ${i + 1}`;
    remove.setAttribute("aria-label", `Remove edit ${i + 1}`);
    row.dataset.param = `edits[${i}]`;
    for (const [name, el] of Object.entries(fields)) el.dataset.param = `edits[${i}].${name}`;
  };
  row.focusFirst = () => feature.focus();
  syncOp();
  describe();
  return row;
}
