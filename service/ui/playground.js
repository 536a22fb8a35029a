// The playground: a prompt, sampling settings and a list of edits; Generate streams the
// baseline and the steered continuation side by side (two POST /v1/completions streams with
// the same settings and seed, one without the edits), then shows the edit report and reads
// each text's top features (POST /v1/inspect) for the token tooltips.

import { api, loadedDictionaries, models, session, streamCompletion } from "./api.js";
import {
  busy, clear, clearErrors, copyText, field, fmt, formError, h, hideTooltip, rovingTokens, select, showError,
  showTooltip, viewError,
} from "./dom.js";
import { editRow } from "./edits.js";
import {
  DEFAULTS, completionBody, curlSnippet, pythonSnippet, stateFromParams, stateToParams,
} from "./share.js";

const SAVED = "steerserve.playground";
// completions refuses max_tokens as max_new_tokens once converted: both belong to one box
const ALIASES = { max_new_tokens: "max_tokens" };

function initialState(params) {
  let saved = {};
  try {
    saved = JSON.parse(sessionStorage.getItem(SAVED) || "{}");
  } catch {
    saved = {};
  }
  const fromUrl = stateFromParams(params);
  const state = { ...DEFAULTS, ...saved };
  for (const name of Object.keys(DEFAULTS)) {
    const key = name === "edits" ? "edit" : name;
    if (params.has(key)) state[name] = fromUrl[name];
  }
  return state;
}

function numberInput(value, attrs = {}) {
  return h("input", { type: "number", step: "any", value: value ?? "", ...attrs });
}

function unescapeStop(text) {
  return text.replace(/\\(.)/g, (_, c) => ({ n: "\n", t: "\t" })[c] ?? c);
}

function escapeStop(text) {
  return text.replace(/\\/g, "\\\\").replace(/\|/g, "\\|").replace(/\n/g, "\\n").replace(/\t/g, "\\t");
}

// "a|b\|c" → ["a", "b|c"]: stop strings split on unescaped bars.
function parseStops(text) {
  const stops = [];
  let current = "";
  for (let i = 0; i < text.length; i += 1) {
    if (text[i] === "\\" && i + 1 < text.length) {
      current += text.slice(i, i + 2);
      i += 1;
    } else if (text[i] === "|") {
      stops.push(current);
      current = "";
    } else current += text[i];
  }
  stops.push(current);
  return stops.map(unescapeStop).filter((s) => s.length);
}

export async function render(root, { params }) {
  const state = initialState(params);
  let served = [];
  let dictionaries = [];
  try {
    [served, dictionaries] = await Promise.all([models(), loadedDictionaries()]);
  } catch (err) {
    return viewError(root, "Playground", err);
  }

  // --- the form -------------------------------------------------------------------------------
  const model = select(served.map((m) => m.id), state.model || served[0]?.id);
  const prompt = h("textarea", { rows: 3, value: state.prompt, spellcheck: "false" });
  const maxTokens = numberInput(state.max_tokens, { min: 1, step: 1 });
  const temperature = numberInput(state.temperature, { min: 0, step: 0.05 });
  const topP = numberInput(state.top_p, { min: 0, max: 1, step: 0.05 });
  const seed = numberInput(state.seed, { min: 0, step: 1, placeholder: "random" });
  const stop = h("input", { type: "text", value: state.stop.map(escapeStop).join("|"), placeholder: "none",
    spellcheck: "false" });
  const dictionaryNames = dictionaries.map((d) => d.name);
  const readout = select(dictionaryNames, state.readout || state.edits[0]?.dictionary || dictionaryNames[0]);

  const editList = h("div", { class: "edit-list", "data-param": "edits" }, formError());
  const rows = [];
  function renumber() {
    rows.forEach((row, i) => row.setIndex(i));
    addEdit.textContent = rows.length ? "+ Add another edit" : "+ Add an edit";
  }
  function addRow(edit, focus = false) {
    const row = editRow(edit, {
      dictionaries,
      onRemove: (target) => {
        rows.splice(rows.indexOf(target), 1);
        target.remove();
        renumber();
        addEdit.focus();
      },
    });
    rows.push(row);
    editList.append(row);
    renumber();
    if (focus) row.focusFirst();
  }
  const addEdit = h("button", { type: "button", class: "secondary", onclick: () => addRow({}, true) });
  for (const edit of state.edits) addRow(edit);
  renumber();

  const generateButton = h("button", { type: "submit", class: "primary", text: "Generate" });
  const stopButton = h("button", { type: "button", class: "secondary", text: "Stop", disabled: true });
  const copyLink = h("button", { type: "button", class: "secondary", text: "Copy link" });
  const copyCurl = h("button", { type: "button", class: "secondary", text: "Copy as curl" });
  const copyPython = h("button", { type: "button", class: "secondary", text: "Copy as Python" });
  const curlText = h("pre", { class: "code", "data-testid": "curl" });
  const pythonText = h("pre", { class: "code", "data-testid": "python" });

  const form = h("form", { class: "panel playground-form", novalidate: true },
    formError(),
    h("div", { class: "grid settings" },
      field("Model", model, { param: "model" }),
      field("Max tokens", maxTokens, { param: "max_tokens" }),
      field("Temperature", temperature, { param: "temperature", hint: "0 = greedy" }),
      field("Top-p", topP, { param: "top_p" }),
      field("Seed", seed, { param: "seed", hint: "empty: a random one, shown here" }),
      field("Stop strings", stop, { param: "stop", hint: "separate with |; \\n is a newline" })),
    field("Prompt", prompt, { param: "prompt", className: "wide" }),
    h("h3", { text: "Edits" }),
    h("p", { class: "hint", text: "Each edit changes one dictionary feature at the positions you pick; "
      + "the steered column uses them all, the baseline none." }),
    editList, addEdit,
    h("div", { class: "actions" }, generateButton, stopButton, copyLink, copyCurl, copyPython,
      field("Token features from", readout, { param: "readout", className: "inline" })));

  // --- the results ------------------------------------------------------------------------------
  function column(title, testid) {
    const progress = h("progress", { max: 1, value: 0, hidden: true });
    const status = h("span", { class: "hint", role: "status" });
    const output = h("div", { class: "output", "data-testid": `${testid}-output`, "aria-live": "polite",
      onmouseleave: hideTooltip, onfocusout: hideTooltip });
    const error = h("p", { class: "form-error", role: "alert", hidden: true });
    const pinned = h("div", { class: "pinned", hidden: true });
    const el = h("section", { class: "panel column", "data-testid": testid, "data-state": "idle" },
      h("h3", { text: title }), h("div", { class: "progress-line" }, progress, status), output, error, pinned);
    return { el, progress, status, output, error, pinned, text: "" };
  }
  const baseline = column("Baseline (no edits)", "baseline");
  const steered = column("Steered", "steered");
  const report = h("section", { class: "panel report", "aria-label": "Edit report", hidden: true });
  const share = h("details", { class: "panel share" }, h("summary", { text: "The same request as curl and Python" }),
    h("p", { class: "hint", text: "One POST /v1/generate with include_baseline gives both texts; the page streams "
      + "two /v1/completions with the same settings instead." }),
    h("h4", { text: "curl" }), curlText, h("h4", { text: "Python" }), pythonText);

  clear(root,
    h("h2", { text: "Playground" }),
    form,
    h("div", { class: "columns" }, baseline.el, steered.el),
    report, share);

  // --- behaviour ---------------------------------------------------------------------------------
  function readState() {
    const value = (input) => (input.value === "" ? null : Number(input.value));
    return {
      model: model.value, prompt: prompt.value, max_tokens: value(maxTokens), temperature: value(temperature),
      top_p: value(topP), seed: value(seed), stop: parseStops(stop.value), edits: rows.map((row) => row.read()),
      readout: readout.value,
    };
  }
  function updateShare(current) {
    const keyed = Boolean(session.key) && !session.open;
    curlText.textContent = curlSnippet(current, { keyed });
    pythonText.textContent = pythonSnippet(current, { keyed });
  }
  function linkFor(current) {
    return `${window.location.href.split("#")[0]}#/playground?${stateToParams(current, { run: true })}`;
  }
  copyLink.addEventListener("click", () => copyText(linkFor(readState()), copyLink));
  copyCurl.addEventListener("click", () => { const s = readState(); updateShare(s); copyText(curlText.textContent, copyCurl); });
  copyPython.addEventListener("click", () => { const s = readState(); updateShare(s); copyText(pythonText.textContent, copyPython); });
  form.addEventListener("input", () => updateShare(readState()));
  updateShare(readState());

  let controller = null;
  stopButton.addEventListener("click", () => controller?.abort());

  async function streamInto(col, body, current, signal) {
    col.text = "";
    col.el.dataset.state = "streaming";
    col.el.dataset.chunks = "0";
    delete col.el.dataset.text;
    col.error.hidden = true;
    col.pinned.hidden = true;
    col.progress.hidden = false;
    col.progress.max = current.max_tokens || 16;
    col.progress.value = 0;
    col.status.textContent = "waiting for the server…";
    const generated = h("span", { class: "gen-text" });
    clear(col.output, h("span", { class: "prompt-text", text: current.prompt }), generated);
    try {
      const result = await streamCompletion(body, {
        signal,
        onDelta: (delta) => {
          col.text += delta;
          generated.textContent = col.text;
          col.el.dataset.chunks = String(Number(col.el.dataset.chunks) + 1);
          col.progress.value = Number(col.el.dataset.chunks);
          col.status.textContent = `streaming… ${col.el.dataset.chunks} / ${col.progress.max} tokens`;
        },
      });
      const usage = result.final?.usage;
      col.el.dataset.text = result.text;
      col.el.dataset.state = "done";
      col.progress.hidden = true;
      col.status.textContent = `${usage?.completion_tokens ?? "?"} tokens · finish: ${result.final?.choices[0].finish_reason}`;
      return result;
    } catch (err) {
      col.el.dataset.state = "error";
      col.progress.hidden = true;
      col.status.textContent = err.name === "AbortError" ? "stopped" : "failed";
      if (err.name !== "AbortError") {
        col.error.textContent = err.describe ? err.describe() : String(err);
        col.error.hidden = false;
      }
      throw err;
    }
  }

  async function generate() {
    clearErrors(form);
    hideTooltip();
    const current = readState();
    if ((current.temperature ?? 0) > 0 && current.seed === null) {
      current.seed = Math.floor(Math.random() * 2 ** 31); // both streams must sample alike
      seed.value = current.seed;
    }
    sessionStorage.setItem(SAVED, JSON.stringify(current));
    history.replaceState(null, "", `#/playground?${stateToParams(current, { run: true })}`);
    updateShare(current);
    controller?.abort();
    controller = new AbortController();
    const { signal } = controller;
    busy(generateButton, true, "Generating…");
    stopButton.disabled = false;
    report.hidden = true;
    steered.el.querySelector("h3").textContent = current.edits.length
      ? `Steered (${current.edits.length} edit${current.edits.length > 1 ? "s" : ""})` : "Steered (no edits: same as baseline)";
    const outcomes = await Promise.allSettled([
      streamInto(baseline, completionBody(current, { withEdits: false }), current, signal),
      streamInto(steered, completionBody(current, { withEdits: true }), current, signal),
    ]);
    busy(generateButton, false);
    stopButton.disabled = true;
    const shown = new Set();
    for (const outcome of outcomes) {
      const err = outcome.reason;
      if (outcome.status === "rejected" && err.name !== "AbortError" && !shown.has(err.message)) {
        shown.add(err.message);
        showError(form, err, { aliases: ALIASES });
      }
    }
    const [base, steer] = outcomes.map((o) => (o.status === "fulfilled" ? o.value : null));
    if (steer) renderReport(steer.final?.edit_report || [], current);
    await Promise.all([[baseline, base], [steered, steer]].map(([col, result]) =>
      result ? readTokens(col, current, result.text) : null));
  }

  function renderReport(entries, current) {
    report.hidden = false;
    if (!current.edits.length) {
      clear(report, h("h3", { text: "Edit report" }), h("p", { class: "hint", text: "No edits were asked for." }));
      return;
    }
    clear(report, h("h3", { text: "Edit report" }), entries.map(reportEntry));
  }

  function reportEntry(entry) {
    const columns = ["Feature", "Ops", "Positions", "Mean before", "Mean after", "Mean ‖Δh‖", "Changed at"];
    const rowsOf = entry.features.map((f) => h("tr", { class: f.changed_positions ? "" : "unchanged" },
      h("td", {}, h("a", { href: `#/feature/${encodeURIComponent(entry.dictionary)}/${f.feature}`, text: `#${f.feature}` })),
      h("td", { text: f.ops.join(", ") }),
      h("td", { class: "num", text: String(f.positions) }),
      h("td", { class: "num", text: fmt(f.mean_before) }),
      h("td", { class: "num", text: fmt(f.mean_after) }),
      h("td", { class: "num", text: fmt(f.mean_delta_norm) }),
      h("td", { text: f.changed_positions ? `${f.changed_positions} positions` : "changed nothing" })));
    return h("div", { class: "report-entry", "data-dictionary": entry.dictionary },
      h("h4", {}, entry.dictionary, " ", h("span", { class: "hint", text: entry.hook })),
      h("p", { text: `${entry.positions_edited} positions edited · mean ‖Δh‖ ${fmt(entry.mean_delta_norm)}` }),
      entry.changed ? null : h("p", { class: "nochange", role: "status", "data-testid": "nochange" },
        h("strong", { text: "This edit changed nothing. " }), entry.note || ""),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, columns.map((label) => h("th", { scope: "col", text: label })))),
        h("tbody", {}, rowsOf))));
  }

  // Each text's top features, read by the dictionary picked under "Token features from".
  async function readTokens(col, current, text) {
    if (!current.readout) return;
    try {
      const read = await api("POST", "v1/inspect", {
        model: current.model, text: current.prompt + text, dictionary: current.readout, top_k: 5,
      });
      let offset = 0;
      const spans = read.tokens.map((token) => {
        const generated = offset >= current.prompt.length;
        offset += token.token.length;
        return h("span", { class: `tok ${generated ? "gen" : "prompt"}${token.token.includes("\n") ? " nl" : ""}`,
          "data-position": token.position, text: token.token });
      });
      clear(col.output, spans);
      const describe = (token) => h("div", {},
        h("strong", { text: JSON.stringify(token.token) }), ` position ${token.position} · ${current.readout}`,
        token.features.length ? h("ol", { class: "feature-list" }, token.features.map((f) => h("li", {},
          h("a", { href: `#/feature/${encodeURIComponent(current.readout)}/${f.feature}`, text: `#${f.feature}` }),
          ` ${fmt(f.activation)}`))) : h("p", { text: "no active feature" }));
      rovingTokens(col.output, spans, {
        label: `${col.el.dataset.testid} tokens: hover or use the arrow keys for their top features`,
        onFocus: (span, i) => showTooltip(span, describe(read.tokens[i])),
        onPick: (span, i) => {
          col.pinned.hidden = false;
          clear(col.pinned, describe(read.tokens[i]));
        },
      });
    } catch (err) {
      col.error.textContent = `token features: ${err.describe ? err.describe() : err}`;
      col.error.hidden = false;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  if (params.get("run") === "1") generate();
  return () => controller?.abort();
}
