// The page's entry point: the views behind #/… routes, the API-key form, and the messages
// for refused keys (401), forbidden actions (403) and rate limits (429).

import { forget, refreshSession, session } from "./api.js";
import * as compare from "./compare.js";
import * as contrast from "./contrast.js";
import { clear, h } from "./dom.js";
import * as dictionaries from "./dictionaries.js";
import * as feature from "./feature.js";
import * as inspector from "./inspector.js";
import * as jobs from "./jobs.js";
import * as playground from "./playground.js";

const VIEWS = {
  playground: { module: playground, title: "Playground", nav: "#/playground" },
  feature: { module: feature, title: "Feature", nav: "#/features" },
  features: { module: feature, title: "Features", nav: "#/features" },
  inspect: { module: inspector, title: "Inspector", nav: "#/inspect" },
  contrast: { module: contrast, title: "Contrast", nav: "#/contrast" },
  compare: { module: compare, title: "Compare", nav: "#/compare" },
  dictionaries: { module: dictionaries, title: "Dictionaries", nav: "#/dictionaries" },
  jobs: { module: jobs, title: "Jobs", nav: "#/jobs" },
};

const view = document.getElementById("view");
const banner = document.getElementById("banner");
const whoami = document.getElementById("whoami");
const keyInput = document.getElementById("api-key");
let cleanup = null;
let rendering = 0;

function parseHash() {
  const hash = window.location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = hash.split("?");
  const segments = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { segments: segments.length ? segments : ["playground"], params: new URLSearchParams(query) };
}

function showBanner(message) {
  banner.hidden = !message;
  banner.textContent = message || "";
}

async function route() {
  const mine = ++rendering;
  cleanup?.();
  cleanup = null;
  const { segments, params } = parseHash();
  const entry = VIEWS[segments[0]];
  for (const link of document.querySelectorAll("nav a")) {
    if (entry && link.getAttribute("href") === entry.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!entry) {
    clear(view, h("h2", { text: "Not found" }), h("p", {}, "No view here; try the ", h("a", { href: "#/playground", text: "playground" }), "."));
    return;
  }
  document.title = `${entry.title} · steerserve`;
  clear(view, h("p", { class: "hint", text: "loading…" }));
  const holder = h("div", { class: "view" });
  const result = await entry.module.render(holder, { segments, params });
  if (mine !== rendering) {
    result?.();
    return;
  }
  view.replaceChildren(holder);
  cleanup = result || null;
}

function describeSession() {
  if (session.open) {
    whoami.textContent = "open server: no key needed";
    whoami.className = "whoami open";
  } else if (session.role) {
    whoami.textContent = `key ${session.name ?? ""} · ${session.role}`;
    whoami.className = `whoami ${session.role}`;
  } else {
    whoami.textContent = session.key ? "key refused" : "no key";
    whoami.className = "whoami none";
  }
  document.body.dataset.role = session.role || "none";
  if (session.error?.status === 401) {
    showUnauthorized(session.error);
  } else if (session.error && session.error.status !== 401) {
    showBanner(session.error.describe());
  } else showBanner("");
}

document.getElementById("access").addEventListener("submit", async (event) => {
  event.preventDefault();
  session.setKey(keyInput.value);
  keyInput.value = "";
  forget();
  await refreshSession();
  route();
});

document.getElementById("forget-key").addEventListener("click", async () => {
  session.setKey("");
  forget();
  await refreshSession();
  route();
});

document.getElementById("skip").addEventListener("click", (event) => {
  event.preventDefault();
  view.focus();
});

function showUnauthorized(failure) {
  showBanner(session.key ? `The server refused this API key (401): ${failure.message}. Type another above.`
    : "This server needs an API key (401): type it above. It is kept only for this browser session.");
}

window.addEventListener("steerserve:unauthorized", (event) => showUnauthorized(event.detail));

session.listeners.add(describeSession);
window.addEventListener("hashchange", route);
await refreshSession();
route();
