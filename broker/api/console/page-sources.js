// Sources: status and counters of the project's managed sources, start and stop.

import { api } from "./api.js";
import { every, fmtNumber, fmtTime, h, showError } from "./ui.js";

const POLL_MS = 2000;

export function mount(main) {
  const tbody = h("tbody");
  main.append(h("h1", {}, "Sources"),
    h("table", { id: "sources" }, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Type"), h("th", {}, "Stream"),
      h("th", {}, "Status"), h("th", { class: "num" }, "Messages in"), h("th", { class: "num" }, "Rows written"),
      h("th", { class: "num" }, "Errors"), h("th", {}, "Last error"), h("th", {}, "Last event (UTC)"), h("th", { class: "num" }, "Lag"),
      h("th", {}, ""))), tbody));

  async function act(id, verb) {
    try {
      await api(`/sources/${encodeURIComponent(id)}/${verb}`, { method: "POST" });
      await refresh();
    } catch (err) { showError(err); }
  }

  async function refresh() {
    const { sources } = await api("/sources");
    tbody.replaceChildren(...sources.map((s) => h("tr", { "data-source": s.name },
      h("td", {}, s.name), h("td", {}, s.type), h("td", {}, h("a", { href: `#/stream/${encodeURIComponent(s.stream)}` }, s.stream)),
      h("td", { class: `status-${s.status} source-status`, title: s.message }, s.status),
      h("td", { class: "num" }, fmtNumber(s.messages_in)), h("td", { class: "num rows-written" }, fmtNumber(s.rows_written)),
      h("td", { class: "num" }, fmtNumber(s.errors)), h("td", {}, s.last_error || "–"), h("td", {}, fmtTime(s.last_event_ms)),
      h("td", { class: "num" }, s.lag === null || s.lag === undefined ? "–" : fmtNumber(s.lag)),
      h("td", {}, s.status === "stopped"
        ? h("button", { class: "secondary", onclick: () => act(s.id, "start") }, "Start")
        : h("button", { class: "danger", onclick: () => act(s.id, "stop") }, "Stop")))));
    if (!sources.length) tbody.append(h("tr", {}, h("td", { colspan: 11, class: "muted" }, "No sources in this project.")));
  }

  return every(POLL_MS, refresh);
}
