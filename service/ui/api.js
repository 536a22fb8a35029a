// The page's only way to the server: JSON calls and completion streams, with the API key
// kept for this browser session (sessionStorage) and every error turned into an ApiFailure
// that carries the envelope's type, message and param.

const KEY_STORAGE = "steerserve.apiKey";

// The API lives beside the page: "/" when the app is at the root, "/prefix/" under a route prefix.
export const base = new URL(".", window.location.href.split("#")[0]);

export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), base).toString();
}

export class ApiFailure extends Error {
  constructor(status, type, message, param, retryAfter) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param ?? null;
    this.retryAfter = retryAfter ?? null;
  }

  // What a person reads: the server's message, why it was refused, and the field it names.
  describe() {
    const prefix = {
      401: "Not signed in (401): ",
      403: "Not allowed for this key (403): ",
      429: "Rate limited (429): ",
    }[this.status] ?? (this.status ? `Error ${this.status}: ` : "");
    const param = this.param ? ` (param: ${this.param})` : "";
    const retry = this.status === 429 && this.retryAfter && !/retry/i.test(this.message)
      ? ` Retry after ${this.retryAfter} s.` : "";
    return `${prefix}${this.message}${param}${retry}`;
  }
}

export const session = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  role: null, // "user" | "admin" | null (unknown: no key or refused)
  name: null,
  open: false,
  listeners: new Set(),
  setKey(key) {
    this.key = key.trim();
    if (this.key) sessionStorage.setItem(KEY_STORAGE, this.key);
    else sessionStorage.removeItem(KEY_STORAGE);
  },
  get isAdmin() {
    return this.role === "admin";
  },
  notify() {
    for (const listener of this.listeners) listener(this);
  },
};

function headers(json = true) {
  const result = {};
  if (json) result["Content-Type"] = "application/json";
  if (session.key) result["Authorization"] = `Bearer ${session.key}`;
  return result;
}

async function failureOf(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    error = { message: `${response.status} ${response.statusText}` };
  }
  const failure = new ApiFailure(response.status, error.type || "http_error",
    error.message || `HTTP ${response.status}`, error.param, response.headers.get("Retry-After"));
  if (response.status === 401) window.dispatchEvent(new CustomEvent("steerserve:unauthorized", { detail: failure }));
  return failure;
}

function networkFailure(err) {
  return new ApiFailure(0, "network_error", `the server could not be reached (${err.message})`, null);
}

export async function api(method, path, body = undefined, { signal } = {}) {
  let response;
  try {
    response = await fetch(apiUrl(path), {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw networkFailure(err);
  }
  if (!response.ok) throw await failureOf(response);
  return response.json();
}

// A multipart upload with progress (fetch cannot report upload progress; XMLHttpRequest can).
export function upload(method, path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, apiUrl(path));
    if (session.key) xhr.setRequestHeader("Authorization", `Bearer ${session.key}`);
    xhr.upload.onprogress = (event) => event.lengthComputable && onProgress(event.loaded / event.total);
    xhr.onerror = () => reject(networkFailure(new Error("upload failed")));
    xhr.onload = () => {
      let body = {};
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = {};
      }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
      const error = body.error || {};
      const failure = new ApiFailure(xhr.status, error.type || "http_error", error.message || `HTTP ${xhr.status}`,
        error.param, xhr.getResponseHeader("Retry-After"));
      if (xhr.status === 401) window.dispatchEvent(new CustomEvent("steerserve:unauthorized", { detail: failure }));
      reject(failure);
    };
    xhr.send(form);
  });
}

// POST /v1/generate with stream: true. onEvent(event) for every server-sent event: a step's
// {delta, token_ids} and, last, the full response (it has an "id", and the last step's delta);
// resolves with that full response once "data: [DONE]" arrives.
export async function streamGenerate(body, { onEvent, signal } = {}) {
  let response;
  try {
    response = await fetch(apiUrl("v1/generate"), {
      method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }), signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw networkFailure(err);
  }
  if (!response.ok) throw await failureOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") {
          if (final) return final;
          throw new ApiFailure(0, "stream_error", "the stream ended without its full response", null);
        }
        const message = JSON.parse(data);
        if (message.error) throw new ApiFailure(500, message.error.type, message.error.message, message.error.param);
        if (message.id !== undefined) final = message;
        onEvent?.(message);
      }
    }
  }
  throw new ApiFailure(0, "stream_error", "the stream ended before the server said it was done", null);
}

// Who the key belongs to; an open server answers role "admin", open: true.
export async function refreshSession() {
  try {
    const me = await api("GET", "v1/whoami");
    Object.assign(session, { role: me.role, name: me.name, open: me.open, error: null });
  } catch (err) {
    Object.assign(session, { role: null, name: null, open: false, error: err });
  }
  session.notify();
  return session;
}

// Small caches of what rarely changes; cleared when a dictionary is deployed or undeployed.
const cache = new Map();

export function cached(path) {
  if (!cache.has(path)) {
    const promise = api("GET", path);
    promise.catch(() => cache.delete(path));
    cache.set(path, promise);
  }
  return cache.get(path);
}

export function forget(prefix = "") {
  for (const key of [...cache.keys()]) if (key.startsWith(prefix)) cache.delete(key);
}

export async function models() {
  return (await cached("v1/models")).data;
}

export async function loadedDictionaries() {
  return (await cached("v1/dictionaries")).data;
}
