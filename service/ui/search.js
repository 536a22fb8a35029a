// A feature-search box (GET /v1/dictionaries/{name}/features?q=): type words, pick a hit.
// Used by the playground's edits and by the feature pages.

import { api } from "./api.js";
import { clear, field, fmt, h, pct, tokenLabel, uid } from "./dom.js";

// A snippet with its matching word marked.
export function snippetView(snippet) {
  if (!snippet) return null;
  const [start, end] = snippet.match;
  const text = snippet.text;
  return h("q", { class: "snippet" }, tokenLabel(text.slice(0, start)),
    h("mark", { text: tokenLabel(text.slice(start, end)) }), tokenLabel(text.slice(end)));
}

export function hitSummary(hit) {
  const promoted = hit.promoted.slice(0, 4).map((p) => JSON.stringify(p.token)).join(" ");
  return `density ${pct(hit.density)} · max ${fmt(hit.max_activation, 2)} · promotes ${promoted}`;
}

// options: dictionary() → name, onPick(hit), label, limit, param (for errors), placeholder.
export function featureSearch({ dictionary, onPick, label = "Search features", limit = 8, param = "q",
  placeholder = "a word from its contexts or tokens" }) {
  const input = h("input", { type: "search", placeholder, autocomplete: "off", "aria-controls": uid("results") });
  const results = h("ul", { class: "search-results", id: input.getAttribute("aria-controls"), hidden: true,
    "aria-label": "Search results" });
  const status = h("p", { class: "hint search-status", role: "status" });
  const wrap = field(label, input, { param, className: "search" });
  wrap.append(status, results);
  let timer = null;
  let seq = 0;

  async function run() {
    const query = input.value.trim();
    const errorSlot = wrap.querySelector(".field-error");
    errorSlot.hidden = true;
    input.removeAttribute("aria-invalid");
    if (!query) {
      results.hidden = true;
      status.textContent = "";
      return;
    }
    const mine = ++seq;
    status.textContent = "searching…";
    try {
      const path = `v1/dictionaries/${encodeURIComponent(dictionary())}/features?` +
        new URLSearchParams({ q: query, limit: String(limit) });
      const found = await api("GET", path);
      if (mine !== seq) return;
      status.textContent = found.matched ? `${found.matched} features match; the best ${found.data.length}:`
        : `no feature matches ${JSON.stringify(query)}`;
      clear(results, found.data.map((hit) => h("li", {},
        h("button", {
          type: "button", class: "hit", "data-feature": hit.feature,
          onclick: () => {
            results.hidden = true;
            status.textContent = `picked feature ${hit.feature}`;
            onPick(hit);
          },
        },
        h("strong", { text: `#${hit.feature}` }), " ",
        h("span", { class: "hint", text: hitSummary(hit) }), h("br"),
        snippetView(hit.snippet) || h("span", { class: "hint", text: `matches promoted ${hit.promoted_matches.map((t) => JSON.stringify(t)).join(" ")}` })))));
      results.hidden = found.data.length === 0;
    } catch (err) {
      if (mine !== seq) return;
      status.textContent = "";
      results.hidden = true;
      errorSlot.textContent = err.describe ? err.describe() : String(err);
      errorSlot.hidden = false;
      input.setAttribute("aria-invalid", "true");
    }
  }

  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(run, 250);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      clearTimeout(timer);
      run();
    } else if (event.key === "Escape") {
      results.hidden = true;
    } else if (event.key === "ArrowDown" && !results.hidden) {
      event.preventDefault();
      results.querySelector("button")?.focus();
    }
  });
  results.addEventListener("keydown", (event) => {
    const buttons = [...results.querySelectorAll("button")];
    const i = buttons.indexOf(document.activeElement);
    if (event.key === "ArrowDown") { event.preventDefault(); buttons[Math.min(buttons.length - 1, i + 1)]?.focus(); }
    if (event.key === "ArrowUp") { event.preventDefault(); (i <= 0 ? input : buttons[i - 1]).focus(); }
    if (event.key === "Escape") { results.hidden = true; input.focus(); }
  });
  document.addEventListener("click", (event) => {
    if (!wrap.contains(event.target)) results.hidden = true;
  });
  wrap.addEventListener("focusout", (event) => {
    if (event.relatedTarget && !wrap.contains(event.relatedTarget)) results.hidden = true;
  });
  input.addEventListener("focus", () => {
    if (results.childElementCount && input.value.trim()) results.hidden = false;
  });
  return { el: wrap, input, run };
}
