// Streams: every stream of the project from ONE list call (polled), rates from two samples,
// filtered and paginated so 1,000 streams render a page of rows, not 1,000.

import { api } from "./api.js";
import { every, fmtNumber, fmtRate, fmtTime, h, showError } from "./ui.js";

const PAGE = 100;
const POLL_MS = 2000;

function held(s) {
  return s.next_seqs.reduce((sum, next, i) => sum + (next - s.first_seqs[i]), 0);
}

// "first – last" per partition ("–" when empty), the first four partitions and a count of the rest
function seqRange(s) {
  const ranges = s.next_seqs.map((next, i) => (next > s.first_seqs[i] ? `${s.first_seqs[i]} – ${next - 1}` : "–"));
  if (ranges.length === 1) return ranges[0];
  const shown = ranges.slice(0, 4).map((r, i) => `p${i}: ${r}`).join(" · ");
  return ranges.length > 4 ? `${shown} · +${ranges.length - 4} more` : shown;
}

export function mount(main) {
  let rows = [], previous = new Map(), rates = new Map(), page = 0, filter = "";
  const count = h("span", { class: "muted", id: "stream-count" }, "loading…");
  const tbody = h("tbody");
  const pager = h("div", { class: "pager" });

  const create = h("form", { class: "inline", id: "create-stream" },
    h("input", { name: "name", placeholder: "new stream name", required: true, size: 20 }),
    h("label", {}, "partitions ", h("input", { name: "partitions", type: "number", min: 1, value: 1, style: "width:5rem" })),
    h("label", {}, "retention (h) ", h("input", { name: "retention", type: "number", min: 1, value: 24, style: "width:5rem" })),
    h("button", { type: "submit" }, "Create stream"));
  create.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = create.elements;
    try {
      await api("/streams", { method: "POST", body: { name: f.name.value.trim(),
        partitions: Number(f.partitions.value), retention_hours: Number(f.retention.value) } });
      f.name.value = "";
      await refresh();
    } catch (err) { showError(err); }
  });

  const search = h("input", { type: "search", placeholder: "filter by name", id: "stream-filter",
    oninput: () => { filter = search.value.trim().toLowerCase(); page = 0; render(); } });

  main.append(h("h1", {}, "Streams ", count), create, h("div", { class: "toolbar" }, search), pager,
    h("table", { id: "streams" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Partitions"),
        h("th", { class: "num" }, "Records held"), h("th", {}, "Sequence range"), h("th", { class: "num" }, "Ingest rec/s"),
        h("th", {}, "Last write (UTC)"), h("th", {}, ""))),
      tbody));

  function shown() {
    return filter ? rows.filter((s) => s.name.toLowerCase().includes(filter)) : rows;
  }

  async function remove(name, button) {
    if (button.dataset.armed !== "1") {   // two clicks: no modal dialog
      button.dataset.armed = "1";
      button.textContent = "confirm delete";
      return;
    }
    try {
      await api(`/streams/${encodeURIComponent(name)}`, { method: "DELETE" });
      await refresh();
    } catch (err) { showError(err); }
  }

  function render() {
    const list = shown();
    const pages = Math.max(1, Math.ceil(list.length / PAGE));
    page = Math.min(page, pages - 1);
    count.textContent = `${fmtNumber(rows.length)} stream${rows.length === 1 ? "" : "s"}` + (filter ? `, ${fmtNumber(list.length)} shown` : "");
    const link = (where, name, text) => h("a", { href: `#/${where}/${encodeURIComponent(name)}` }, text);
    tbody.replaceChildren(...list.slice(page * PAGE, (page + 1) * PAGE).map((s) => h("tr", { "data-stream": s.name },
      h("td", {}, link("stream", s.name, s.name), s.typed ? h("span", { class: "muted" }, " typed") : ""),
      h("td", { class: "num" }, s.partitions + (s.readable_partitions > s.partitions ? ` (+${s.readable_partitions - s.partitions} closed)` : "")),
      h("td", { class: "num" }, fmtNumber(held(s))),
      h("td", {}, seqRange(s)),
      h("td", { class: "num rate" }, fmtRate(rates.get(s.name))),
      h("td", {}, fmtTime(s.last_ts)),
      h("td", {}, link("browse", s.name, "browse"), " · ", link("tail", s.name, "tail"), " · ",
        link("put", s.name, "put"), " · ",
        h("button", { class: "link", onclick: (e) => remove(s.name, e.target) }, "delete")))));
    pager.replaceChildren(
      h("button", { class: "secondary", id: "prev-streams", disabled: page === 0, onclick: () => { page--; render(); } }, "‹ prev"),
      h("span", { id: "stream-page" }, `page ${page + 1} of ${pages}`),
      h("button", { class: "secondary", id: "next-streams", disabled: page >= pages - 1, onclick: () => { page++; render(); } }, "next ›"));
  }

  async function refresh() {
    const now = performance.now();
    const answer = await api("/streams");
    rows = answer.streams;
    const next = new Map();
    for (const s of rows) {
      const before = previous.get(s.name);
      next.set(s.name, { at: now, count: s.put_records });
      if (before) rates.set(s.name, Math.max(0, (s.put_records - before.count) / ((now - before.at) / 1000)));
    }
    previous = next;
    render();
  }

  return every(POLL_MS, refresh);
}
