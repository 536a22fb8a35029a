// The edit report under the playground: for each dictionary (and each hook's steering vectors)
// the positions edited and ‖Δh‖; for each feature its mean activation before and after, where
// its condition fired and the raw value a calibrated unit resolved to; for each vector the norm
// of what it added; and a plain "This edit changed nothing" when it did nothing.

import { clear, fmt, h } from "./dom.js";

function table(columns, rows) {
  return h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, columns.map((label) => h("th", { scope: "col", text: label })))),
    h("tbody", {}, rows)));
}

function fired(entry) {
  const conditions = entry.conditions || (entry.when ? [entry] : []);
  if (!conditions.length) return null;
  return conditions.map((c) => `${c.fired_positions} of ${c.eligible_positions} positions`).join("; ");
}

function featureTable(entry) {
  const conditional = entry.features.some((f) => f.conditions?.length);
  const calibrated = entry.features.some((f) => f.resolved_values?.length);
  const columns = ["Feature", "Ops", "Positions", "Mean before", "Mean after", "Mean ‖Δh‖", "Changed at",
    conditional ? "Condition held at" : null, calibrated ? "Raw value" : null].filter(Boolean);
  return table(columns, entry.features.map((f) => h("tr", { class: f.changed_positions ? "" : "unchanged" },
    h("td", {}, h("a", { href: `#/feature/${encodeURIComponent(entry.dictionary)}/${f.feature}`, text: `#${f.feature}` })),
    h("td", { text: f.ops.join(", ") }),
    h("td", { class: "num", text: String(f.positions) }),
    h("td", { class: "num", text: fmt(f.mean_before) }),
    h("td", { class: "num", text: fmt(f.mean_after) }),
    h("td", { class: "num", text: fmt(f.mean_delta_norm) }),
    h("td", { text: f.changed_positions ? `${f.changed_positions} positions` : "changed nothing" }),
    conditional ? h("td", { text: fired(f) ?? "—" }) : null,
    calibrated ? h("td", { class: "num", text: (f.resolved_values || []).map((r) => fmt(r.raw_value)).join(", ") || "—" })
      : null)));
}

function vectorTable(entry) {
  const conditional = entry.vectors.some((v) => v.when);
  const columns = ["Vector", "Op", "Positions", "Mean ‖added‖", conditional ? "Condition held at" : null].filter(Boolean);
  return table(columns, entry.vectors.map((v) => h("tr", {},
    h("td", { text: v.vector }),
    h("td", { text: v.op }),
    h("td", { class: "num", text: String(v.positions) }),
    h("td", { class: "num", text: fmt(v.mean_added_norm) }),
    conditional ? h("td", { text: fired(v) ?? "—" }) : null)));
}

function reportEntry(entry) {
  const vectors = entry.dictionary === null;
  return h("div", { class: "report-entry", "data-dictionary": entry.dictionary ?? "", "data-hook": entry.hook },
    h("h4", {}, vectors ? "Steering vectors" : entry.dictionary, " ", h("span", { class: "hint", text: entry.hook })),
    h("p", { text: `${entry.positions_edited} positions edited · mean ‖Δh‖ ${fmt(entry.mean_delta_norm)}` }),
    entry.changed ? null : h("p", { class: "nochange", role: "status", "data-testid": "nochange" },
      h("strong", { text: "This edit changed nothing. " }), entry.note || ""),
    entry.features.length ? featureTable(entry) : null,
    vectors && entry.vectors?.length ? vectorTable(entry) : null);
}

export function renderReport(report, entries, edits) {
  report.hidden = false;
  if (!edits.length) {
    clear(report, h("h3", { text: "Edit report" }), h("p", { class: "hint", text: "No edits were asked for." }));
    return;
  }
  clear(report, h("h3", { text: "Edit report" }), entries.map(reportEntry));
}
