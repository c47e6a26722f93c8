// Small DOM helpers, the error banner and formatting.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const banner = () => document.getElementById("banner");

// Every failure is shown, never swallowed: a catalogue error with its reason, a 401 with the key form.
export function showError(err) {
  if (err && err.name === "AbortError") return;
  const text = err && err.reason ? `${err.reason}: ${err.message}` : String((err && err.message) || err);
  document.getElementById("banner-text").textContent = text;
  banner().hidden = false;
  if (err && err.status === 401) document.getElementById("key-form").hidden = false;
}

export function clearError() { banner().hidden = true; }

// A number, or a string of digits (sequence numbers, counts of records: exact as BigInt)
export function fmtNumber(n) {
  return (typeof n === "string" && /^-?\d+$/.test(n) ? BigInt(n) : Number(n)).toLocaleString("en-US");
}

export function fmtRate(perSecond) {
  if (perSecond === null || perSecond === undefined) return "–";
  return perSecond >= 100 ? fmtNumber(Math.round(perSecond)) : perSecond.toFixed(1);
}

export function fmtTime(ms) {
  if (!ms) return "–";
  return new Date(Number(ms)).toISOString().replace("T", " ").replace("Z", "");
}

// What a page shows that is gone for good: polling it again would only fail again.
const GONE = new Set(["STREAM_NOT_FOUND", "APP_NOT_FOUND", "SOURCE_NOT_FOUND", "QUERY_NOT_FOUND"]);

// setInterval that also runs at once, skips a tick while the last one runs or while the tab is
// hidden (a background tab costs the broker nothing), reports errors, and stops once what it
// polls is gone (a stream deleted under its page).
export function every(ms, fn) {
  let busy = false, stopped = false, first = true;
  const stop = () => { stopped = true; clearInterval(id); };
  const tick = async () => {
    if (busy || stopped || (!first && document.hidden)) return;
    busy = true;
    first = false;
    try { await fn(); } catch (err) { showError(err); if (err && GONE.has(err.reason)) stop(); } finally { busy = false; }
  };
  const id = setInterval(tick, ms);
  tick();
  return stop;
}

// Replaces a container's children only when what it shows changed (`key`: the data it was made
// from), so a 2 s poll of unchanged data keeps the reader's text selection and keyboard focus.
export function renderIfChanged(container, key, make) {
  if (container.dataset.shown === key) return;
  container.dataset.shown = key;
  container.replaceChildren(...make());
}
