// DOM helpers: element building (text only, never HTML strings), labelled fields with an
// error slot, errors placed next to the control their `param` names, shaded tokens with
// keyboard navigation, and one tooltip.

let nextId = 0;

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "style") for (const [k, v] of Object.entries(value)) el.style.setProperty(k, v);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else if (name === "checked" || name === "disabled" || name === "selected" || name === "hidden") el[name] = Boolean(value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function uid(prefix = "f") {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

// A labelled control with its own error slot; `param` is the API parameter it sets.
export function field(label, control, { param, hint, className = "" } = {}) {
  control.id ||= uid();
  const error = h("p", { class: "field-error", role: "alert", hidden: true, id: uid("err") });
  control.setAttribute("aria-describedby", error.id);
  return h("div", { class: `field ${className}`, "data-param": param },
    h("label", { for: control.id, text: label }), control,
    hint ? h("p", { class: "hint", text: hint }) : null, error);
}

export function select(options, value, attrs = {}) {
  return h("select", attrs, options.map((option) => {
    const [v, label] = Array.isArray(option) ? option : [option, option];
    return h("option", { value: v, selected: String(v) === String(value), text: label });
  }));
}

export function clearErrors(root) {
  for (const slot of root.querySelectorAll(".field-error, .form-error")) {
    slot.hidden = true;
    slot.textContent = "";
  }
  for (const control of root.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

// "edits[0].value" → ["edits[0].value", "edits[0]", "edits"]: the most specific slot that exists.
function paramCandidates(param) {
  const result = [];
  let rest = param;
  while (rest) {
    result.push(rest);
    const cut = Math.max(rest.lastIndexOf("."), rest.lastIndexOf("["));
    rest = cut > 0 ? rest.slice(0, cut) : "";
  }
  return result;
}

// Show an ApiFailure next to the control its param names (within root), else in root's form-level slot.
export function showError(root, err, { aliases = {} } = {}) {
  const message = err.describe ? err.describe() : String(err.message || err);
  const param = err.param ? aliases[err.param] ?? err.param : null;
  let slot = null;
  let control = null;
  for (const candidate of param ? paramCandidates(param) : []) {
    const holder = root.querySelector(`[data-param="${CSS.escape(candidate)}"]`);
    if (holder) {
      slot = holder.querySelector(":scope > .field-error, :scope > .form-error");
      control = holder.querySelector(":scope > input, :scope > select, :scope > textarea, :scope .value-number");
      if (slot) break;
    }
  }
  slot ||= root.querySelector(".form-error");
  if (!slot) {
    slot = h("p", { class: "form-error", role: "alert" });
    root.prepend(slot);
  }
  slot.textContent = message;
  slot.hidden = false;
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.focus({ preventScroll: false });
  }
  return slot;
}

// A view that could not load: its heading and the reason, where the view would be.
export function viewError(root, title, err) {
  clear(root, h("h2", { text: title }),
    h("p", { class: "form-error", role: "alert", text: err.describe ? err.describe() : String(err) }));
  return null;
}

export function formError() {
  return h("p", { class: "form-error", role: "alert", hidden: true });
}

export function busy(button, on, label) {
  if (on) {
    button.dataset.label ??= button.textContent;
    if (label) button.textContent = label;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
  } else {
    if (button.dataset.label) button.textContent = button.dataset.label;
    delete button.dataset.label;
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// --- tokens ---------------------------------------------------------------------------------

// What a token looks like on screen: a newline shows as ↵ (and breaks the line when asked).
export function tokenLabel(token, { breakLines = false } = {}) {
  return breakLines ? token.replace(/\n/g, "↵\n") : token.replace(/\n/g, "↵");
}

// A token span shaded by fraction ∈ [0, 1] (its activation over the reference maximum).
export function tokenSpan(token, activation, fraction, { breakLines = false, title } = {}) {
  const shade = Math.max(0, Math.min(1, fraction || 0));
  return h("span", {
    class: activation > 0 ? "tok active" : "tok",
    "data-activation": activation,
    "data-shade": shade.toFixed(4),
    title: title ?? `${JSON.stringify(token)} · activation ${fmt(activation)}`,
    style: { "--shade": shade.toFixed(4) },
    text: tokenLabel(token, { breakLines }),
  });
}

// The one drag in progress (a span being selected); released wherever the mouse button goes up.
let releaseDrag = null;
document.addEventListener("mouseup", () => releaseDrag?.());

// Arrow-key navigation over a list of tokens: one tab stop, Left/Right/Home/End move, Enter/Space picks.
// With onSpan, a span of tokens can be selected too: shift+click or shift+arrows from the picked
// token, or a drag across tokens; onSpan(first, last) is called with the span's ends, in order.
export function rovingTokens(container, tokens, { onFocus, onPick, onSpan, label } = {}) {
  container.setAttribute("role", "listbox");
  container.setAttribute("aria-label", label || "Tokens");
  container.setAttribute("aria-orientation", "horizontal");
  if (onSpan) container.setAttribute("aria-multiselectable", "true");
  let anchor = null; // the picked token: where a span starts
  let dragFrom = null;
  let dragTo = null;
  let dragged = false;
  tokens.forEach((token, i) => {
    token.setAttribute("role", "option");
    token.setAttribute("tabindex", i === 0 ? "0" : "-1");
    token.setAttribute("aria-selected", "false");
    token.dataset.index = i;
    token.addEventListener("focus", () => onFocus?.(token, i));
    token.addEventListener("mouseenter", () => {
      onFocus?.(token, i);
      if (dragFrom !== null && (dragTo !== null || i !== dragFrom)) {
        dragTo = i;
        mark(dragFrom, i);
      }
    });
    token.addEventListener("mousedown", (event) => {
      if (onSpan && event.button === 0 && !event.shiftKey) {
        dragFrom = i;
        dragTo = null;
      }
    });
    token.addEventListener("click", (event) => {
      if (dragged) return; // the click that ends a drag
      if (event.shiftKey && onSpan && anchor !== null) span(anchor, i);
      else pick(i);
    });
  });
  if (onSpan) {
    releaseDrag = () => {
      if (dragFrom !== null && dragTo !== null) {
        span(dragFrom, dragTo);
        dragged = true;
        setTimeout(() => (dragged = false), 0);
      }
      dragFrom = null;
      dragTo = null;
    };
  }
  function focusOn(i) {
    for (const token of tokens) token.setAttribute("tabindex", "-1");
    tokens[i].setAttribute("tabindex", "0");
    tokens[i].focus();
  }
  function move(i) {
    if (tokens.length) focusOn(Math.max(0, Math.min(tokens.length - 1, i)));
  }
  function mark(first, last) {
    const [lo, hi] = first <= last ? [first, last] : [last, first];
    tokens.forEach((token, i) => {
      token.setAttribute("aria-selected", String(i >= lo && i <= hi));
      token.classList.toggle("in-span", lo !== hi && i >= lo && i <= hi);
    });
    return [lo, hi];
  }
  function pick(i) {
    anchor = i;
    mark(i, i);
    focusOn(i);
    onPick?.(tokens[i], i);
  }
  function span(first, last) {
    anchor = first;
    const [lo, hi] = mark(first, last);
    focusOn(last);
    onSpan(lo, hi);
  }
  // a property, not addEventListener: a container reused for new tokens keeps one handler
  container.onkeydown = (event) => {
    const i = Number(document.activeElement?.dataset?.index ?? 0);
    const keys = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: tokens.length - 1 };
    if (event.key in keys) {
      event.preventDefault();
      const target = Math.max(0, Math.min(tokens.length - 1, keys[event.key]));
      if (event.shiftKey && onSpan) span(anchor ?? i, target);
      else move(target);
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      pick(i);
    }
  };
  return { move, pick, span };
}

// One tooltip for the page, shown beside a token on hover or keyboard focus.
let tooltip = null;

export function showTooltip(anchor, content) {
  if (!tooltip) {
    tooltip = h("div", { class: "tooltip", role: "tooltip", id: "token-tooltip" });
    document.body.append(tooltip);
  }
  clear(tooltip, content);
  tooltip.hidden = false;
  const box = anchor.getBoundingClientRect();
  const width = Math.min(320, window.innerWidth - 16);
  tooltip.style.setProperty("max-width", `${width}px`);
  const left = Math.max(8, Math.min(window.scrollX + box.left, window.scrollX + window.innerWidth - width - 8));
  tooltip.style.setProperty("left", `${left}px`);
  tooltip.style.setProperty("top", `${window.scrollY + box.bottom + 6}px`);
  anchor.setAttribute("aria-describedby", "token-tooltip");
}

export function hideTooltip() {
  if (tooltip) tooltip.hidden = true;
}

// --- numbers ----------------------------------------------------------------------------------

export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
  if (value !== 0 && Math.abs(value) < 10 ** -digits) return value.toExponential(1);
  return String(Number(value.toFixed(digits)));
}

export function pct(value, digits = 2) {
  return value === null || value === undefined ? "—" : `${(100 * value).toFixed(digits)}%`;
}

export function pm(stat, digits = 4) {
  if (!stat || stat.mean === undefined) return "—";
  const se = stat.se === null || stat.se === undefined || Number.isNaN(stat.se) ? "" : ` ± ${stat.se.toFixed(digits)}`;
  return `${stat.mean.toFixed(digits)}${se}`;
}

export function copyText(text, button) {
  const done = (ok) => {
    if (!button) return;
    const label = button.textContent;
    button.textContent = ok ? "Copied" : "Select and copy below";
    setTimeout(() => (button.textContent = label), 1500);
  };
  if (navigator.clipboard?.writeText) navigator.clipboard.writeText(text).then(() => done(true), () => done(false));
  else done(false);
}
