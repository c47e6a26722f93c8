// The console's shell: hash routes -> pages, the project picker, the API key form, the error banner.
// A page is `mount(main, ...params)` returning a cleanup function (timers, open streams).

import { api, session } from "./api.js";
import { clearError, showError } from "./ui.js";
import * as streams from "./page-streams.js";
import * as stream from "./page-stream.js";
import * as browse from "./page-browse.js";
import * as tail from "./page-tail.js";
import * as put from "./page-put.js";
import * as apps from "./page-apps.js";
import * as sources from "./page-sources.js";
import * as sql from "./page-sql.js";

const ROUTES = { streams, stream, browse, tail, put, apps, sources, sql };
let cleanup = () => {};

function route() {
  cleanup();
  clearError();
  const main = document.getElementById("main");
  main.replaceChildren();
  let name, params;
  try {
    [name, ...params] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  } catch (err) {   // a malformed %-escape (URIError): say so, show no page
    cleanup = () => {};
    showError(new Error(`This address cannot be read (${err.message}): ${location.hash}`));
    return;
  }
  const page = ROUTES[name] || streams;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.getAttribute("href") === `#/${name || "streams"}`);
  }
  try {
    cleanup = page.mount(main, ...params) || (() => {});
  } catch (err) {
    cleanup = () => {};
    showError(err);
  }
}

async function loadProjects() {
  const found = await api("/projects", { project: false });   // a key's answer names its project
  const list = document.getElementById("projects");
  list.replaceChildren(...found.projects.map((p) => Object.assign(document.createElement("option"), { value: p })));
  if (found.key_project && session.project !== found.key_project) {   // a key works in its own project only
    session.project = found.key_project;
    document.getElementById("project").value = session.project;
    return true;
  }
  return false;
}

// The projects first (a key moves the page to its own project), then the page.
function start() {
  loadProjects().catch(showError).finally(route);
}

function setUp() {
  const project = document.getElementById("project");
  project.value = session.project;
  project.addEventListener("change", () => {
    session.project = project.value.trim() || "default";
    project.value = session.project;
    route();
  });
  const form = document.getElementById("key-form");
  const forget = document.getElementById("forget-key");
  forget.hidden = !session.key;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    session.key = input.value.trim();
    input.value = "";
    form.hidden = true;
    forget.hidden = !session.key;
    start();
  });
  forget.addEventListener("click", () => {
    session.key = "";
    forget.hidden = true;
    route();
  });
  document.getElementById("banner-close").addEventListener("click", clearError);
  window.addEventListener("unhandledrejection", (event) => showError(event.reason));
  window.addEventListener("hashchange", route);
  start();
}

setUp();
