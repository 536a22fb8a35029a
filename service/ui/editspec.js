// The CLI's edit form, read and written by the same grammar as editing/edits.py's parse_edit:
//
//   DICT:FEATURE:OP[:VALUE][@POSITIONS][,unit=max][,when=DICT:FEATURE>T]
//   vector:NAME:VALUE[@POSITIONS][,unit=norm][,when=DICT:FEATURE<T]
//
// parseEdit(text) → {edit} or {error}: the edit with every EditSpec field (null where unset),
// accepted and refused exactly where parse_edit and EditSpec accept and refuse it (numbers as
// Python's int() and float() read them). editToText is its inverse; wireEdit is the JSON the API takes.

export const FEATURE_OPS = ["ablate", "scale", "set", "add"];
export const OPS = [...FEATURE_OPS, "vector"];
export const POSITIONS = ["all", "prompt", "generated"];
export const UNITS = { feature: ["raw", "max_activation"], vector: ["raw", "residual_norm"] };
const UNIT_ALIASES = { raw: "raw", max: "max_activation", max_activation: "max_activation", norm: "residual_norm",
  residual_norm: "residual_norm" };
const UNIT_TEXT = { raw: "", max_activation: ",unit=max", residual_norm: ",unit=norm" };
const MAX_ABS_VALUE = 1e6;
const MAX_NAME = 64;

// Python's str.strip() whitespace, and the literals int() and float() take (digits may be joined by single underscores).
const WS = "[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]*";
const DIGITS = "\\d(?:_?\\d)*";
const INT = new RegExp(`^${WS}([+-]?${DIGITS})${WS}$`);
const FLOAT = new RegExp(`^${WS}([+-]?(?:${DIGITS}(?:\\.(?:${DIGITS})?)?|\\.${DIGITS})(?:[eE][+-]?${DIGITS})?)${WS}$`);
const SPECIAL = new RegExp(`^${WS}([+-]?)(inf|infinity|nan)${WS}$`, "i");

class EditTextError extends Error {}

function pyInt(text) {
  const match = INT.exec(text);
  if (!match) throw new EditTextError(`invalid literal for int() with base 10: ${JSON.stringify(text)}`);
  return Number(match[1].replace(/_/g, ""));
}

function pyFloat(text) {
  const match = FLOAT.exec(text);
  if (match) return Number(match[1].replace(/_/g, ""));
  const special = SPECIAL.exec(text);
  if (!special) throw new EditTextError(`could not convert string to float: ${JSON.stringify(text)}`);
  const value = special[2].toLowerCase() === "nan" ? NaN : Infinity;
  return special[1] === "-" ? -value : value;
}

function isNumber(text) {
  try {
    pyFloat(text);
    return true;
  } catch {
    return false;
  }
}

function checkName(name, field) {
  const length = [...name].length;
  if (length < 1 || length > MAX_NAME) throw new EditTextError(`${field}: 1 to ${MAX_NAME} characters`);
}

function checkValue(value, field) {
  if (!Number.isFinite(value)) throw new EditTextError(`${field}: must be a finite number`);
  if (Math.abs(value) > MAX_ABS_VALUE) throw new EditTextError(`${field}: must be within ±${MAX_ABS_VALUE}`);
}

// EditSpec's field and cross-field checks.
function checked(edit) {
  if (edit.dictionary !== null) checkName(edit.dictionary, "dictionary");
  if (edit.vector !== null) checkName(edit.vector, "vector");
  if (edit.feature !== null && edit.feature < 0) throw new EditTextError("feature: must be ≥ 0");
  if (!OPS.includes(edit.op)) throw new EditTextError(`op: ${JSON.stringify(edit.op)} is not one of ${OPS.join(", ")}`);
  if (edit.value !== null) checkValue(edit.value, "value");
  if (!POSITIONS.includes(edit.positions)) {
    throw new EditTextError(`positions: ${JSON.stringify(edit.positions)} is not one of ${POSITIONS.join(", ")}`);
  }
  if (edit.when) {
    checkName(edit.when.dictionary, "when.dictionary");
    if (edit.when.feature < 0) throw new EditTextError("when.feature: must be ≥ 0");
    checkValue(edit.when.above ?? edit.when.below, "when threshold");
  }
  if (edit.op === "ablate" && edit.value !== null) throw new EditTextError("'value' must be omitted for op 'ablate'");
  if (edit.op !== "ablate" && edit.value === null) throw new EditTextError(`'value' is required for op '${edit.op}'`);
  if (edit.op === "vector") {
    if (edit.vector === null) throw new EditTextError("'vector' (the name of a stored steering vector) is required for op 'vector'");
    if (edit.dictionary !== null || edit.feature !== null) {
      throw new EditTextError("op 'vector' takes 'vector', not 'dictionary' and 'feature'");
    }
    if (edit.value_unit === "max_activation") {
      throw new EditTextError("value_unit 'max_activation' applies to set and add; a vector takes raw or residual_norm");
    }
    return edit;
  }
  if (edit.dictionary === null || edit.feature === null) throw new EditTextError(`op '${edit.op}' needs 'dictionary' and 'feature'`);
  if (edit.vector !== null) throw new EditTextError(`'vector' is only for op 'vector', not '${edit.op}'`);
  if (edit.value_unit === "residual_norm") throw new EditTextError("value_unit 'residual_norm' applies to op 'vector'");
  if (edit.value_unit === "max_activation" && !["set", "add"].includes(edit.op)) {
    throw new EditTextError(`value_unit 'max_activation' applies to set and add, not '${edit.op}'`);
  }
  return edit;
}

// DICT:FEATURE>T or DICT:FEATURE<T (the first '>' wins, as in _parse_condition).
function parseCondition(text) {
  for (const [sign, field] of [[">", "above"], ["<", "below"]]) {
    const at = text.indexOf(sign);
    if (at < 0) continue;
    const head = text.slice(0, at);
    const colon = head.lastIndexOf(":");
    const condition = { dictionary: colon < 0 ? "" : head.slice(0, colon), feature: pyInt(head.slice(colon + 1)),
      above: null, below: null };
    condition[field] = pyFloat(text.slice(at + 1));
    return condition;
  }
  throw new EditTextError(`condition ${JSON.stringify(text)}: expected DICT:FEATURE>THRESHOLD or DICT:FEATURE<THRESHOLD`);
}

function parse(text) {
  const [first, ...options] = text.split(",");
  const at = first.indexOf("@");
  const head = at < 0 ? first : first.slice(0, at);
  const fields = { positions: (at < 0 ? "" : first.slice(at + 1)) || "all", value_unit: "raw", when: null };
  for (const option of options) {
    const eq = option.indexOf("=");
    const key = eq < 0 ? option : option.slice(0, eq);
    const value = eq < 0 ? "" : option.slice(eq + 1);
    if (key === "unit" && Object.hasOwn(UNIT_ALIASES, value)) fields.value_unit = UNIT_ALIASES[value];
    else if (key === "when" && value) fields.when = parseCondition(value);
    else throw new EditTextError(`unknown option ${JSON.stringify(option)}; use unit=raw|max|norm or when=DICT:FEATURE>THRESHOLD`);
  }
  const parts = head.split(":");
  if (parts.length === 3 && parts[0] === "vector" && isNumber(parts[2])) {
    return checked({ dictionary: null, feature: null, op: "vector", value: pyFloat(parts[2]), vector: parts[1], ...fields });
  }
  if (parts.length !== 3 && parts.length !== 4) {
    throw new EditTextError("expected DICT:FEATURE:OP[:VALUE][@all|prompt|generated] or vector:NAME:VALUE");
  }
  if (!/^[0-9]+$/.test(parts[1]) || (parts.length === 4 && !isNumber(parts[3]))) {
    throw new EditTextError("FEATURE must be an integer and VALUE a number");
  }
  return checked({ dictionary: parts[0], feature: Number(parts[1]), op: parts[2],
    value: parts.length === 4 ? pyFloat(parts[3]) : null, vector: null, ...fields });
}

export function parseEdit(text) {
  try {
    return { edit: parse(text) };
  } catch (err) {
    if (!(err instanceof EditTextError)) throw err;
    return { error: `edit ${JSON.stringify(text)}: ${err.message}` };
  }
}

// A comma-separated list of edits, as the jobs form takes them: an item that is an option
// (unit=…, when=…) belongs to the edit before it.
export function splitEdits(text) {
  const items = [];
  for (const piece of text.split(",")) {
    const item = piece.trim();
    if (/^(unit|when)=/.test(item) && items.length) items[items.length - 1] += `,${item}`;
    else if (item) items.push(item);
  }
  return items;
}

export function conditionText(when) {
  const above = when.above !== null && when.above !== undefined;
  return `${when.dictionary}:${when.feature}${above ? ">" : "<"}${above ? when.above : when.below}`;
}

export function editToText(edit) {
  const value = edit.value === null || edit.value === undefined ? "" : `:${edit.value}`;
  const head = edit.op === "vector" ? `vector:${edit.vector}${value}`
    : `${edit.dictionary}:${edit.feature}:${edit.op}${edit.op === "ablate" ? "" : value}`;
  const when = edit.when ? `,when=${conditionText(edit.when)}` : "";
  return `${head}@${edit.positions || "all"}${UNIT_TEXT[edit.value_unit || "raw"]}${when}`;
}

// The edit as the API takes it: only the fields its op uses, defaults left out.
export function wireEdit(edit) {
  const wire = edit.op === "vector" ? { op: "vector", vector: edit.vector }
    : { dictionary: edit.dictionary, feature: edit.feature, op: edit.op };
  if (edit.op !== "ablate") wire.value = edit.value;
  wire.positions = edit.positions || "all";
  if (edit.value_unit && edit.value_unit !== "raw") wire.value_unit = edit.value_unit;
  if (edit.when) {
    const above = edit.when.above !== null && edit.when.above !== undefined;
    wire.when = { dictionary: edit.when.dictionary, feature: edit.when.feature,
      [above ? "above" : "below"]: above ? edit.when.above : edit.when.below };
  }
  return wire;
}
