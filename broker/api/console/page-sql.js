// SQL: a Timeplus-style streaming query; rows are appended as they arrive, Cancel stops it.

import { api, stream } from "./api.js";
import { fmtNumber, h, showError } from "./ui.js";

const KEEP = 1000;   // rows kept on screen (the newest)

export function mount(main) {
  let controller = null, queryId = null, received = 0;
  const sql = h("textarea", { id: "sql", rows: 4, spellcheck: false }, "select * from my_stream");
  const status = h("p", { class: "muted", id: "sql-status" }, "Streaming queries run until cancelled; table(s) reads what is stored and ends.");
  const thead = h("thead"), tbody = h("tbody");
  const run = h("button", { id: "sql-run", onclick: () => start().catch(showError) }, "Run");
  const cancel = h("button", { id: "sql-cancel", class: "danger", disabled: true, onclick: () => stop() }, "Cancel");
  main.append(h("h1", {}, "SQL"), sql, h("p", { class: "toolbar" }, run, cancel), status,
    h("table", { id: "sql-rows" }, thead, tbody));

  function done(text) {
    controller = null;
    queryId = null;
    run.disabled = false;
    cancel.disabled = true;
    status.textContent = text;
  }

  async function stop() {
    const id = queryId, mine = controller;
    if (id) {
      try { await api(`/queries/${id}/cancel`, { method: "POST" }); } catch (err) { showError(err); }
    }
    if (mine) mine.abort();
    done(`Cancelled after ${fmtNumber(received)} rows.`);
  }

  function line(text) {
    const item = JSON.parse(text);
    if (item.query) {
      queryId = item.query.id;
      thead.replaceChildren(h("tr", {}, item.query.header.map((c) => h("th", { title: c.type }, c.name))));
      status.textContent = "Running…";
    } else if (item.rows) {
      // only the rows that stay are built: the newest KEEP, older ones dropped from the top
      const kept = item.rows.length > KEEP ? item.rows.slice(-KEEP) : item.rows;
      const added = document.createDocumentFragment();
      for (const row of kept) added.append(h("tr", {}, row.map((v) => h("td", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)))));
      if (kept.length === KEEP) tbody.replaceChildren(added);
      else {
        for (let extra = tbody.rows.length + kept.length - KEEP; extra > 0; extra--) tbody.firstChild.remove();
        tbody.append(added);
      }
      received += item.rows.length;
      status.textContent = `Running: ${fmtNumber(received)} rows.`;
    } else if (item.metrics) {
      status.textContent = `Running: ${fmtNumber(received)} rows, ${fmtNumber(item.metrics.scanned_rows ?? 0)} records scanned.`;
    } else if (item.end) {
      const text = `Query ${item.end.status} after ${fmtNumber(received)} rows.`;
      if (item.end.status === "failed") showError({ reason: "QUERY_FAILED", message: item.end.message });
      done(item.end.message ? `${text} ${item.end.message}` : text);
    }
  }

  async function start() {
    if (controller) await stop();
    received = 0;
    thead.replaceChildren();
    tbody.replaceChildren();
    const mine = controller = new AbortController();
    run.disabled = true;
    cancel.disabled = false;
    status.textContent = "Starting…";
    try {
      await stream("/console/api/queries", { method: "POST", body: { sql: sql.value }, signal: mine.signal, onItem: line });
    } catch (err) {
      if (controller === mine) done("Not running.");
      throw err;
    }
  }

  return () => { if (controller) stop(); };
}
