// Streams: a page of the project's streams from ONE list call (polled), filtered and paged by the
// broker (?filter=&offset=&limit=), so 1,000 streams cost a page of rows, not 1,000; rates from two samples.

import { api } from "./api.js";
import { every, fmtNumber, fmtRate, fmtTime, h, showError } from "./ui.js";

const PAGE = 100;
const POLL_MS = 2000;

// "first – last" per partition ("–" when empty), the first four partitions and a count of the rest.
// Sequence numbers are strings (exact past 2^53): compared and decremented as BigInt.
function seqRange(s) {
  const ranges = s.ranges.map(([first, next]) => (BigInt(next) > BigInt(first) ? `${first} – ${BigInt(next) - 1n}` : "–"));
  if (s.readable_partitions === 1) return ranges[0];
  const shown = ranges.map((r, i) => `p${i}: ${r}`).join(" · ");
  return s.readable_partitions > ranges.length ? `${shown} · +${s.readable_partitions - ranges.length} more` : shown;
}

export function mount(main) {
  let rows = [], total = 0, matched = 0, armed = null, previous = new Map(), rates = new Map(), page = 0, filter = "";
  const count = h("span", { class: "muted", id: "stream-count" }, "loading…");
  const tbody = h("tbody");
  const pager = h("div", { class: "pager" });

  const create = h("form", { class: "inline", id: "create-stream" },
    h("input", { name: "name", placeholder: "new stream name", required: true, size: 20 }),
    h("label", {}, "partitions ", h("input", { name: "partitions", type: "number", min: 1, value: 1, class: "narrow" })),
    h("label", {}, "retention (h) ", h("input", { name: "retention", type: "number", min: 1, value: 24, class: "narrow" })),
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
    oninput: () => { filter = search.value.trim().toLowerCase(); page = 0; refresh().catch(showError); } });

  main.append(h("h1", {}, "Streams ", count), create, h("div", { class: "toolbar" }, search), pager,
    h("table", { id: "streams" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Partitions"),
        h("th", { class: "num" }, "Records held"), h("th", {}, "Sequence range"), h("th", { class: "num" }, "Ingest rec/s"),
        h("th", {}, "Last write (UTC)"), h("th", {}, ""))),
      tbody));

  // Two clicks, no modal dialog. The armed stream is page state, not the button's: the 2 s
  // refresh rebuilds the rows and must not disarm it between the two clicks.
  async function remove(name) {
    if (armed !== name) {
      armed = name;
      render();
      return;
    }
    armed = null;
    try {
      await api(`/streams/${encodeURIComponent(name)}`, { method: "DELETE" });
      await refresh();
    } catch (err) { showError(err); }
  }

  function render() {
    const pages = Math.max(1, Math.ceil(matched / PAGE));
    count.textContent = `${fmtNumber(total)} stream${total === 1 ? "" : "s"}` + (filter ? `, ${fmtNumber(matched)} shown` : "");
    const link = (where, name, text) => h("a", { href: `#/${where}/${encodeURIComponent(name)}` }, text);
    tbody.replaceChildren(...rows.map((s) => h("tr", { "data-stream": s.name },
      h("td", {}, link("stream", s.name, s.name), s.typed ? h("span", { class: "muted" }, " typed") : ""),
      h("td", { class: "num" }, s.partitions + (s.readable_partitions > s.partitions ? ` (+${s.readable_partitions - s.partitions} closed)` : "")),
      h("td", { class: "num" }, fmtNumber(s.records)),
      h("td", {}, seqRange(s)),
      h("td", { class: "num rate" }, fmtRate(rates.get(s.name))),
      h("td", {}, fmtTime(s.last_ts)),
      h("td", {}, link("browse", s.name, "browse"), " · ", link("tail", s.name, "tail"), " · ",
        link("put", s.name, "put"), " · ",
        h("button", { class: "link", onclick: () => remove(s.name) }, armed === s.name ? "confirm delete" : "delete")))));
    pager.replaceChildren(
      h("button", { class: "secondary", id: "prev-streams", disabled: page === 0, onclick: () => { page--; refresh().catch(showError); } }, "‹ prev"),
      h("span", { id: "stream-page" }, `page ${page + 1} of ${pages}`),
      h("button", { class: "secondary", id: "next-streams", disabled: page >= pages - 1, onclick: () => { page++; refresh().catch(showError); } }, "next ›"));
  }

  let asked = 0;
  async function refresh() {
    const mine = ++asked;   // a filter typed or a page turned meanwhile: the newest answer wins
    const now = performance.now();
    const answer = await api("/streams", { query: { offset: page * PAGE, limit: PAGE, filter } });
    if (mine !== asked) return;
    if (answer.streams.length === 0 && page > 0 && answer.matched > 0) {   // the page emptied: go back
      page = Math.max(0, Math.ceil(answer.matched / PAGE) - 1);
      return refresh();
    }
    rows = answer.streams;
    total = answer.total;
    matched = answer.matched;
    const next = new Map(previous);
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
