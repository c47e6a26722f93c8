// Calls to the console API (/console/api/...): the project and the API key on every request,
// catalogue errors ({code, message, reason}) thrown as ApiError for the page's error banner.

const KEY = "sluice.apiKey";
const PROJECT = "sluice.project";

export const session = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
  get project() { return sessionStorage.getItem(PROJECT) || "default"; },
  set project(value) { sessionStorage.setItem(PROJECT, value || "default"); },
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.reason = body && body.reason;
  }
}

export function headers(extra = {}) {
  const out = { ...extra };
  if (session.key) out["X-Api-Key"] = session.key;
  return out;
}

function url(path, query, project = true) {
  const u = new URL(path, location.origin);
  if (project) u.searchParams.set("project", session.project);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") u.searchParams.set(name, value);
  }
  return u;
}

async function failure(resp) {
  let body = null;
  try { body = await resp.json(); } catch { body = { message: `${resp.status} ${resp.statusText}` }; }
  return new ApiError(resp.status, body);
}

// A JSON call: api("/streams"), api("/streams", {method: "POST", body: {...}}). `project: false`:
// no project parameter (the key's own project, or `default` on an open broker).
// Every write (not GET) says Content-Type: application/json, even without a body: the broker
// refuses writes without it (what a page of another site could send without a preflight).
function jsonHeaders(method) {
  return headers(method === "GET" ? {} : { "Content-Type": "application/json" });
}

export async function api(path, { method = "GET", body, query, signal, project = true } = {}) {
  const init = { method, headers: jsonHeaders(method), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(url("/console/api" + path, query, project), init);
  if (!resp.ok) throw await failure(resp);
  return resp.status === 204 ? null : resp.json();
}

// Long-lived streams (live tails, SQL queries) open at once in this browser, across its tabs. A
// browser opens at most 6 HTTP/1.1 connections to a host: six streams would leave none for
// anything else and freeze every console tab. The slots are Web Locks (shared by the tabs of
// this origin, freed when a tab closes); where the browser has none (a page not served from
// localhost or https), the count is this tab's.
export const MAX_STREAMS = 3;
let openHere = 0;

async function streamSlot() {
  if (navigator.locks) {
    for (let i = 0; i < MAX_STREAMS; i++) {
      let release;
      const held = new Promise((resolve) => { release = resolve; });
      const got = await new Promise((answer) => {
        navigator.locks.request(`sluice.console.stream.${i}`, { ifAvailable: true }, (lock) => {
          answer(lock !== null);
          return lock ? held : undefined;   // held until released
        }).catch(() => answer(false));
      });
      if (got) return release;
    }
    return null;
  }
  if (openHere >= MAX_STREAMS) return null;
  openHere++;
  let released = false;
  return () => { if (!released) { released = true; openHere--; } };
}

export class TooManyStreams extends Error {
  constructor() {
    super(`At most ${MAX_STREAMS} live streams (tails, SQL queries) are open at once in this browser: ` +
      "stop one, here or in another tab (a browser opens only 6 connections to the broker).");
    this.reason = "TOO_MANY_STREAMS";
  }
}

// A streaming answer read as it arrives (fetch + ReadableStream: unlike EventSource it sends the
// key), holding one of the MAX_STREAMS slots while it runs. `split` cuts the text into items
// ("\n" for NDJSON, "\n\n" for server-sent events).
export async function stream(path, options) {
  const release = await streamSlot();
  if (!release) throw new TooManyStreams();
  try {
    return await readStream(path, options);
  } finally {
    release();
  }
}

async function readStream(path, { method = "GET", body, query, signal, split = "\n", onItem }) {
  const init = { method, headers: jsonHeaders(method), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(url(path, query), init);
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    // only the new text is searched (and the last few characters, where a separator may have
    // been cut in two): an item of megabytes arriving in many chunks is read once, not rescanned
    const from = Math.max(0, pending.length - split.length + 1);
    pending += decoder.decode(value, { stream: true });
    let start = 0, cut = pending.indexOf(split, from);
    while (cut >= 0) {
      const item = pending.slice(start, cut);
      start = cut + split.length;
      if (item.trim()) onItem(item);
      cut = pending.indexOf(split, start);
    }
    if (start) pending = pending.slice(start);
  }
  if (pending.trim()) onItem(pending);
}

// One server-sent event's fields: {event, data, id} (comment lines, e.g. heartbeats, give none).
export function parseEvent(text) {
  const out = { event: "message", data: "", id: null };
  for (const line of text.split("\n")) {
    if (line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const name = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (name === "data") out.data += (out.data ? "\n" : "") + value;
    else if (name === "event") out.event = value;
    else if (name === "id") out.id = value;
  }
  return out;
}
