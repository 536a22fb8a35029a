// The playground: a prompt, sampling settings and a list of edits; Generate streams the
// baseline and the steered continuation side by side (two POST /v1/generate streams with the
// same settings and seed, one without the edits), then shows the edit report. Each stream also
// reads its own run's top features at every token (return_features), for the token tooltips:
// the steered column's are the steered run's activations.

import { api, loadedDictionaries, models, session, streamGenerate } from "./api.js";
import {
  busy, clear, clearErrors, copyText, field, fmt, formError, h, hideTooltip, rovingTokens, select, showError,
  showTooltip, viewError,
} from "./dom.js";
import { editRow } from "./edits.js";
import { renderReport } from "./report.js";
import { DEFAULTS, curlSnippet, pythonSnippet, stateFromParams, stateToParams, streamBody } from "./share.js";

const SAVED = "steerserve.playground";
// the server names the fields of /v1/generate; the page's boxes are these
const ALIASES = { max_new_tokens: "max_tokens", return_features: "readout", "return_features.dictionary": "readout" };

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
  const readoutName = state.readout || state.edits.find((e) => e.dictionary)?.dictionary || dictionaryNames[0];
  const readout = select(dictionaryNames, readoutName);
  if (readoutName && !dictionaryNames.includes(readoutName)) {
    readout.append(h("option", { value: readoutName, selected: true, text: `${readoutName} (not loaded)` }));
  }
  let vectorList = null;
  const loadVectors = () => (vectorList ??= api("GET", "v1/vectors").then((r) => r.data)
    .catch((err) => { vectorList = null; throw err; }));

  const editList = h("div", { class: "edit-list", "data-param": "edits" }, formError());
  const rows = [];
  function renumber() {
    rows.forEach((row, i) => row.setIndex(i));
    addEdit.textContent = rows.length ? "+ Add another edit" : "+ Add an edit";
  }
  function addRow(edit, focus = false) {
    const row = editRow(edit, {
      dictionaries,
      loadVectors,
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
    h("p", { class: "hint", text: "Each edit changes one dictionary feature, or adds a stored steering vector, at the "
      + "positions you pick (optionally only where a feature is above or below a threshold); the steered column uses "
      + "them all, the baseline none." }),
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
      + "two /v1/generate calls with the same settings instead, each reading its own run's features." }),
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
    col.el.dataset.events = "0";
    col.el.dataset.tokens = "0";
    delete col.el.dataset.text;
    col.error.hidden = true;
    col.pinned.hidden = true;
    col.progress.hidden = false;
    col.progress.max = current.max_tokens || 32;
    col.progress.value = 0;
    col.status.textContent = "waiting for the server…";
    const generated = h("span", { class: "gen-text" });
    clear(col.output, h("span", { class: "prompt-text", text: current.prompt }), generated);
    let tokens = 0;
    try {
      const final = await streamGenerate(body, {
        signal,
        onEvent: (event) => {
          col.text += event.delta ?? "";
          tokens += event.token_ids?.length ?? 0;
          generated.textContent = col.text;
          col.el.dataset.events = String(Number(col.el.dataset.events) + 1);
          col.el.dataset.tokens = String(tokens);
          col.progress.value = tokens;
          if (event.id === undefined) col.status.textContent = `streaming… ${tokens} / ${col.progress.max} tokens`;
        },
      });
      col.text = final.text;
      generated.textContent = final.text;
      col.el.dataset.text = final.text;
      col.el.dataset.tokens = String(final.tokens.length);
      col.el.dataset.state = "done";
      col.progress.hidden = true;
      col.status.textContent = `${final.tokens.length} tokens · finish: ${final.finish_reason}`;
      return final;
    } catch (err) {
      col.el.dataset.state = "error";
      col.progress.hidden = true;
      col.status.textContent = err.name === "AbortError" ? "stopped" : "failed";
      // a refused request is the form's (its message goes beside the control it names); a broken stream is this column's
      if (err.name !== "AbortError" && !(err.status >= 400 && err.status < 500)) {
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
      streamInto(baseline, streamBody(current, { withEdits: false }), current, signal),
      streamInto(steered, streamBody(current, { withEdits: true }), current, signal),
    ]);
    busy(generateButton, false);
    stopButton.disabled = true;
    const shown = new Set();
    for (const outcome of outcomes) {
      const err = outcome.reason;
      if (outcome.status === "rejected" && err.name !== "AbortError" && err.status >= 400 && err.status < 500
        && !shown.has(err.message)) {
        shown.add(err.message);
        showError(form, err, { aliases: ALIASES });
      }
    }
    const [base, steer] = outcomes.map((o) => (o.status === "fulfilled" ? o.value : null));
    if (steer) renderReport(report, steer.edit_report || [], current.edits);
    for (const [col, result] of [[baseline, base], [steered, steer]]) if (result) showTokens(col, current, result);
  }

  // The run's tokens, each with the top features its own run had there (return_features): hover,
  // focus (arrow keys) or pick one. The last token is sampled and never fed back, so it has none.
  function showTokens(col, current, result) {
    if (!result.features) return;
    const read = new Map(result.features.map((entry) => [entry.position, entry]));
    const full = current.prompt + result.text;
    const pieces = [];
    let offset = 0;
    for (let p = 0; p < result.prompt_tokens + result.tokens.length && offset < full.length; p += 1) {
      const generated = p >= result.prompt_tokens;
      const last = p === result.prompt_tokens + result.tokens.length - 1;
      let text = read.get(p)?.token ?? (last ? full.slice(offset) : null);
      if (text === null) return; // no token text to draw: keep the plain text
      text = text.slice(0, full.length - offset); // a stop string may cut the last tokens short
      pieces.push({ position: p, text, generated, entry: read.get(p) ?? null });
      offset += text.length;
    }
    if (pieces.map((piece) => piece.text).join("") !== full) return; // a character split across tokens
    const spans = pieces.map((piece) => h("span", {
      class: `tok ${piece.generated ? "gen" : "prompt"}${piece.text.includes("\n") ? " nl" : ""}`,
      "data-position": piece.position, "data-read": piece.entry ? "1" : "0", text: piece.text,
    }));
    clear(col.output, spans);
    const name = current.readout;
    const describe = (piece) => h("div", {},
      h("strong", { text: JSON.stringify(piece.text) }), ` position ${piece.position} · ${name}`,
      !piece.entry ? h("p", { text: "not read: the run ended before this token went through the model" })
        : piece.entry.features.length ? h("ol", { class: "feature-list" }, piece.entry.features.map((f) => h("li", {},
          h("a", { href: `#/feature/${encodeURIComponent(name)}/${f.feature}`, text: `#${f.feature}` }),
          ` ${fmt(f.activation)}`))) : h("p", { text: "no active feature" }));
    rovingTokens(col.output, spans, {
      label: `${col.el.dataset.testid} tokens: hover or use the arrow keys for their top features in this run`,
      onFocus: (span, i) => showTooltip(span, describe(pieces[i])),
      onPick: (span, i) => {
        col.pinned.hidden = false;
        clear(col.pinned, describe(pieces[i]));
      },
    });
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  const { linkErrors } = stateFromParams(params);
  if (linkErrors.length) {
    showError(form, { describe: () => `The link's edits could not all be read, so it does not run: ${linkErrors.join("; ")}`,
      param: "edits" });
  } else if (params.get("run") === "1") generate();
  return () => controller?.abort();
}
