// Consumer apps: the list, create/delete, and one app's checkpoints and lag per partition
// (sequence numbers and lag are strings from the API, summed as BigInt).

import { api } from "./api.js";
import { every, fmtNumber, fmtTime, h, renderIfChanged, showError } from "./ui.js";

const POLL_MS = 2000;

export function mount(main, selected) {
  const list = h("tbody");
  const detail = h("div", { id: "app-lag" });
  const create = h("form", { class: "inline", id: "create-app" },
    h("input", { name: "name", placeholder: "new app name", required: true }), h("button", { type: "submit" }, "Create app"));
  create.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/apps", { method: "POST", body: { name: create.elements.name.value.trim() } });
      create.elements.name.value = "";
      await refresh();
    } catch (err) { showError(err); }
  });
  main.append(h("h1", {}, "Consumer apps"), create,
    h("table", { id: "apps" }, h("thead", {}, h("tr", {}, h("th", {}, "App"), h("th", {}, "Created (UTC)"),
      h("th", {}, "Streams with checkpoints"), h("th", {}, ""))), list), detail);

  // Two clicks, as a stream's delete (it drops every checkpoint of the app); the armed app is
  // page state, so the 2 s refresh does not disarm it between the two clicks.
  let armed = null, apps = [];
  // The app this page shows, once its delete begins: no refresh asks its lag any more (one that
  // did after the delete got a 404), and the delete waits for a refresh already under way.
  let gone = null, current = Promise.resolve();
  async function remove(name) {
    if (armed !== name) {
      armed = name;
      render();
      return;
    }
    armed = null;
    if (name === selected) {
      gone = name;
      await current.catch(() => {});
    }
    try {
      await api(`/apps/${encodeURIComponent(name)}`, { method: "DELETE" });
      if (name === selected) location.hash = "#/apps";
      await refresh();
    } catch (err) { showError(err); }
  }

  function render() {
    renderIfChanged(list, JSON.stringify([apps, armed]), () => apps.map((a) => h("tr", {},
      h("td", {}, h("a", { href: `#/apps/${encodeURIComponent(a.name)}` }, a.name)), h("td", {}, fmtTime(a.created_ms)),
      h("td", {}, a.streams.join(", ") || "–"),
      h("td", {}, h("button", { class: "link", onclick: () => remove(a.name) }, armed === a.name ? "confirm delete" : "delete")))));
  }

  function refresh() {
    current = load();
    return current;
  }

  async function load() {
    ({ apps } = await api("/apps"));
    render();
    if (!selected || selected === gone) return;
    const lag = await api(`/apps/${encodeURIComponent(selected)}/lag`);
    renderIfChanged(detail, JSON.stringify(lag), () => [h("h2", {}, `Lag of ${lag.name}`),
      lag.streams.length ? "" : h("p", { class: "muted" }, "No checkpoints yet."),
      ...lag.streams.map((s) => h("div", {}, h("h2", {}, "Stream ", h("a", { href: `#/stream/${encodeURIComponent(s.stream)}` }, s.stream),
        ` — total lag ${fmtNumber(String(s.partitions.reduce((n, p) => n + BigInt(p.lag), 0n)))}`),
        h("table", { class: "lag", "data-stream": s.stream }, h("thead", {}, h("tr", {}, h("th", {}, "Partition"),
          h("th", { class: "num" }, "Checkpoint"), h("th", { class: "num" }, "Earliest"), h("th", { class: "num" }, "Latest"),
          h("th", { class: "num" }, "Lag"))),
        h("tbody", {}, s.partitions.map((p) => h("tr", {}, h("td", {}, p.partition), h("td", { class: "num" }, p.checkpoint ?? "–"),
          h("td", { class: "num" }, p.earliest), h("td", { class: "num" }, p.latest),
          h("td", { class: "num lag-value" }, fmtNumber(p.lag))))))))]);
  }

  return every(POLL_MS, refresh);
}
