// Dictionaries: every dictionary in the store with its metrics and whether it is deployed;
// for admins, upload (PUT, multipart, with progress), deploy and undeploy, with the server's
// errors shown beside the control that caused them.

import { api, forget, session, upload } from "./api.js";
import { busy, clear, clearErrors, field, fmt, formError, h, pct, showError } from "./dom.js";

function metric(entry, name, format = fmt) {
  const value = entry.metrics?.[name];
  return value === undefined ? "—" : format(value);
}

export async function render(root) {
  const admin = session.isAdmin;
  const table = h("div", { class: "table-wrap" });
  const status = h("p", { class: "hint", role: "status" });
  clear(root, h("h2", { text: "Dictionaries" }),
    h("p", { class: "hint", text: admin ? "Deploy loads a stored dictionary into every replica of its model without a "
      + "restart; undeploy unloads it." : "Deploying, undeploying and uploading need an admin key." }),
    status, h("section", { class: "panel" }, table,
      h("p", { class: "hint", text: "Metrics come from each dictionary's metrics.json; CE recovered appears once an "
        + "evaluation wrote it there (steerserve eval --dictionary NAME --write-metrics). The Jobs view measures "
        + "it for any stored dictionary." })),
    admin ? uploadForm(refresh) : null);

  async function refresh() {
    status.textContent = "loading…";
    let entries;
    try {
      entries = (await api("GET", "v1/dictionaries?stored=true")).data;
    } catch (err) {
      status.textContent = "";
      clear(table, h("p", { class: "form-error", role: "alert", text: err.describe() }));
      return;
    }
    status.textContent = `${entries.length} dictionaries, ${entries.filter((e) => e.deployed).length} deployed`;
    const headers = ["Name", "Model", "Architecture", "Hook", "Features", "fvu", "l0", "CE recovered", "Dead fraction",
      "Deployed", admin ? "Actions" : null].filter(Boolean);
    clear(table, h("table", { class: "dictionaries" },
      h("thead", {}, h("tr", {}, headers.map((label) => h("th", { scope: "col", text: label })))),
      h("tbody", {}, entries.map((entry) => row(entry)))));
  }

  function row(entry) {
    const name = encodeURIComponent(entry.name);
    const error = h("p", { class: "form-error", role: "alert", hidden: true });
    const cells = [
      h("th", { scope: "row" }, entry.deployed ? h("a", { href: `#/features?dict=${name}`, text: entry.name }) : entry.name,
        entry.error ? h("p", { class: "form-error", text: entry.error }) : null),
      h("td", { text: entry.model ?? "—" }),
      h("td", { text: entry.architecture ?? "—" }),
      h("td", {}, h("code", { text: entry.hook ?? "—" })),
      h("td", { class: "num", text: entry.d_sae ?? "—" }),
      h("td", { class: "num", text: metric(entry, "fvu") }),
      h("td", { class: "num", text: metric(entry, "l0", (v) => fmt(v, 1)) }),
      h("td", { class: "num", text: metric(entry, "ce_loss_recovered") }),
      h("td", { class: "num", text: metric(entry, "dead_fraction", (v) => pct(v, 1)) }),
      h("td", {}, h("span", { class: entry.deployed ? "badge on" : "badge", text: entry.deployed ? "deployed" : "stored" })),
    ];
    if (admin) {
      const button = h("button", {
        type: "button", class: entry.deployed ? "secondary small" : "primary small",
        text: entry.deployed ? "Undeploy" : "Deploy", "aria-label": `${entry.deployed ? "Undeploy" : "Deploy"} ${entry.name}`,
      });
      button.addEventListener("click", async () => {
        error.hidden = true;
        busy(button, true, entry.deployed ? "Undeploying…" : "Deploying…");
        try {
          const body = entry.deployed && entry.model ? { model: entry.model } : {};
          await api(entry.deployed ? "DELETE" : "POST", `v1/dictionaries/${name}/deploy`, body);
          forget("v1/dictionaries");
          forget("v1/models");
          await refresh();
        } catch (err) {
          busy(button, false);
          error.textContent = err.describe();
          error.hidden = false;
        }
      });
      cells.push(h("td", {}, button, error));
    }
    return h("tr", { "data-name": entry.name }, cells);
  }

  await refresh();
  return null;
}

function uploadForm(refresh) {
  const name = h("input", { type: "text", placeholder: "my-dictionary", pattern: "[a-z0-9][a-z0-9._-]{0,63}",
    autocomplete: "off", spellcheck: "false" });
  const config = h("input", { type: "file", accept: ".json,application/json" });
  const weights = h("input", { type: "file", accept: ".safetensors" });
  const metrics = h("input", { type: "file", accept: ".json,application/json" });
  const progress = h("progress", { max: 1, value: 0, hidden: true });
  const status = h("p", { class: "hint", role: "status" });
  const button = h("button", { type: "submit", class: "primary", text: "Upload" });
  const form = h("form", { class: "panel", "aria-label": "Upload a dictionary", novalidate: true },
    h("h3", { text: "Upload a dictionary" }),
    h("p", { class: "hint", text: "A native dictionary: config.json and sae.safetensors (and optionally metrics.json). "
      + "It is validated fully; a bad upload changes nothing." }),
    formError(),
    h("div", { class: "grid" }, field("Name", name, { param: "name" }),
      field("config.json", config, { param: "config.json" }),
      field("sae.safetensors", weights, { param: "sae.safetensors" }),
      field("metrics.json (optional)", metrics, { param: "metrics.json" })),
    h("div", { class: "actions" }, button, progress, status));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    if (!name.value.trim()) {
      showError(form, { describe: () => "name: give the dictionary a name", param: "name" });
      return;
    }
    const data = new FormData();
    for (const [part, input] of [["config.json", config], ["sae.safetensors", weights], ["metrics.json", metrics]]) {
      if (input.files[0]) data.append(part, input.files[0], part);
    }
    busy(button, true, "Uploading…");
    progress.hidden = false;
    status.textContent = "";
    try {
      await upload("PUT", `v1/dictionaries/${encodeURIComponent(name.value.trim())}`, data, (f) => (progress.value = f));
      status.textContent = `installed ${name.value.trim()}; deploy it from the table above`;
      await refresh();
    } catch (err) {
      showError(form, err);
    } finally {
      busy(button, false);
      progress.hidden = true;
    }
  });
  return form;
}
