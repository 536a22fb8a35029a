// The playground's request as a URL, and as the equivalent curl and Python calls.
//
// A link holds every setting: #/playground?model=…&prompt=…&max_tokens=24&temperature=0.8&top_p=1
// &seed=7&stop=…&edit=pythia-tiny-l2:7:set:6@all&edit=vector:NAME:4@all,when=…&readout=…&run=1
// (edits in the CLI's form, see editspec.js; run=1 generates as soon as the link opens).

import { base } from "./api.js";
import { editToText, parseEdit, wireEdit } from "./editspec.js";

export const DEFAULTS = Object.freeze({
  model: "", prompt: "Return the number of", max_tokens: 24, temperature: 0, top_p: 1, seed: null,
  stop: [], edits: [], readout: "",
});

function number(params, name, fallback) {
  if (!params.has(name)) return fallback;
  const text = params.get(name);
  return text === "" ? null : Number(text);
}

export function stateFromParams(params) {
  const parsed = params.getAll("edit").map(parseEdit);
  return {
    model: params.get("model") ?? DEFAULTS.model,
    prompt: params.get("prompt") ?? DEFAULTS.prompt,
    max_tokens: number(params, "max_tokens", DEFAULTS.max_tokens),
    temperature: number(params, "temperature", DEFAULTS.temperature),
    top_p: number(params, "top_p", DEFAULTS.top_p),
    seed: number(params, "seed", DEFAULTS.seed),
    stop: params.getAll("stop"),
    edits: parsed.filter((p) => p.edit).map((p) => p.edit),
    readout: params.get("readout") ?? DEFAULTS.readout,
    linkErrors: parsed.filter((p) => p.error).map((p) => p.error),
  };
}

export function stateToParams(state, { run = false } = {}) {
  const params = new URLSearchParams();
  if (state.model) params.set("model", state.model);
  params.set("prompt", state.prompt);
  for (const name of ["max_tokens", "temperature", "top_p", "seed"]) {
    if (state[name] !== null && state[name] !== undefined) params.set(name, String(state[name]));
  }
  for (const stop of state.stop) params.append("stop", stop);
  for (const edit of state.edits) params.append("edit", editToText(edit));
  if (state.readout) params.set("readout", state.readout);
  if (run) params.set("run", "1");
  return params;
}

// Only what the user set: an empty box means "the server's default", never a made-up value.
function sampling(state) {
  const body = {};
  for (const name of ["temperature", "top_p", "seed"]) {
    if (state[name] !== null && state[name] !== undefined) body[name] = state[name];
  }
  if (state.stop.length) body.stop = state.stop;
  return body;
}

export const TOKEN_FEATURES = 5; // top features a token, for the playground's tooltips

// The same generation as one call: POST /v1/generate with include_baseline.
export function generateBody(state) {
  const body = { prompt: state.prompt };
  if (state.model) body.model = state.model;
  if (state.max_tokens !== null) body.max_new_tokens = state.max_tokens;
  Object.assign(body, sampling(state));
  body.edits = state.edits.map(wireEdit);
  body.include_baseline = true;
  return body;
}

// The two streams the playground sends: steered (with the edits) and baseline (none), the same
// settings and seed; each reads its own run's top features at every token (return_features).
export function streamBody(state, { withEdits }) {
  const { include_baseline: _, ...body } = generateBody(state);
  if (!withEdits) body.edits = [];
  body.stream = true;
  if (state.readout) body.return_features = { dictionary: state.readout, top_k: TOKEN_FEATURES };
  return body;
}

export function serverUrl() {
  return base.toString().replace(/\/$/, "");
}

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

export function curlSnippet(state, { keyed }) {
  const lines = [`curl -s ${serverUrl()}/v1/generate`, "  -H 'Content-Type: application/json'"];
  if (keyed) lines.push('  -H "Authorization: Bearer $STEERSERVE_API_KEY"');
  lines.push(`  -d ${shellQuote(JSON.stringify(generateBody(state)))}`);
  return lines.join(" \\\n");
}

const HELPERS = { ablate: "Ablate", scale: "Scale", set: "Set", add: "Add", vector: "Vector" };

function py(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "number") return `${value}`;
  return JSON.stringify(value); // a JSON string is a valid Python string literal
}

// One edit as the client's helper call: Set("d", 7, 6, positions="all", unit=..., when=When(...)).
function pyEdit(edit) {
  const args = edit.op === "vector" ? [py(edit.vector), py(edit.value)] : [py(edit.dictionary), py(edit.feature)];
  if (edit.op !== "ablate" && edit.op !== "vector") args.push(py(edit.value));
  args.push(`positions=${py(edit.positions)}`);
  if (edit.value_unit) args.push(`unit=${py(edit.value_unit)}`);
  if (edit.when) {
    const side = "above" in edit.when ? "above" : "below";
    args.push(`when=When(${py(edit.when.dictionary)}, ${py(edit.when.feature)}, ${side}=${py(edit.when[side])})`);
  }
  return `${HELPERS[edit.op]}(${args.join(", ")})`;
}

export function pythonSnippet(state, { keyed }) {
  const body = generateBody(state);
  const helpers = [...new Set(body.edits.map((edit) => HELPERS[edit.op]))];
  if (body.edits.some((edit) => edit.when)) helpers.push("When");
  const args = [`    ${py(body.prompt)},`];
  if (body.model) args.push(`    model=${py(body.model)},`);
  if (body.max_new_tokens !== undefined) args.push(`    max_new_tokens=${py(body.max_new_tokens)},`);
  for (const name of ["temperature", "top_p", "seed", "stop"]) {
    if (body[name] !== undefined) args.push(`    ${name}=${py(body[name])},`);
  }
  args.push("    include_baseline=True,");
  args.push(`    edits=[${body.edits.map(pyEdit).join(", ")}],`);
  const lines = [];
  if (keyed) lines.push("import os", "");
  lines.push(`from clients.client import ${["Client", ...helpers.sort()].join(", ")}`, "");
  lines.push(keyed ? `client = Client(${py(serverUrl())}, api_key=os.environ["STEERSERVE_API_KEY"])`
    : `client = Client(${py(serverUrl())})`);
  lines.push("out = client.generate(", ...args, ")");
  lines.push('print("baseline:", out["baseline"]["text"])', 'print("steered: ", out["text"])',
    'print(out["edit_report"])');
  return lines.join("\n");
}
