// Partition browser: a cursor of any type, a page of records at a time, each decoded (JSON
// pretty-printed, text, or hex for binary), with a hex toggle.

import { api } from "./api.js";
import { preview } from "./decode.js";
import { fmtTime, h, showError } from "./ui.js";

const TYPES = ["TRIM_HORIZON", "LATEST", "AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER", "AT_TIMESTAMP"];

export function mount(main, name) {
  const path = `/streams/${encodeURIComponent(name)}/records`;
  let next = null, records = [];
  const form = h("form", { class: "inline", id: "browse-form" },
    h("label", {}, "partition ", h("select", { name: "partition" })),
    h("label", {}, "cursor ", h("select", { name: "type" }, TYPES.map((t) => h("option", { value: t }, t)))),
    h("input", { name: "seq", placeholder: "sequence number", size: 16 }),
    h("label", { class: "at-time" }, "UTC ", h("input", { name: "time", type: "datetime-local", step: 1 })),
    h("label", {}, "limit ", h("input", { name: "limit", type: "number", min: 1, max: 1000, value: 50, class: "narrow" })),
    h("button", { type: "submit" }, "Read"),
    h("button", { type: "button", class: "secondary", id: "next-page", disabled: true, onclick: () => read(true) }, "Next page"),
    h("label", {}, h("input", { type: "checkbox", name: "hex", onchange: () => render() }), " hex"));
  const status = h("p", { class: "muted", id: "browse-status" }, "Pick a cursor and read.");
  const tbody = h("tbody");
  main.append(h("h1", {}, "Browse ", h("a", { href: `#/stream/${encodeURIComponent(name)}` }, name)), form, status,
    h("table", { id: "records" }, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Seq"), h("th", {}, "Time (UTC)"),
      h("th", {}, "Partition key"), h("th", {}, "Data"))), tbody));
  const f = form.elements;
  const showInputs = () => {   // the sequence number or the time, for the cursor types that take one
    f.seq.hidden = !f.type.value.endsWith("SEQUENCE_NUMBER");
    form.querySelector(".at-time").hidden = f.type.value !== "AT_TIMESTAMP";
  };
  f.type.addEventListener("change", showInputs);
  showInputs();

  api(`/streams/${encodeURIComponent(name)}`).then((d) => {
    f.partition.replaceChildren(...d.partition_list.map((p) => h("option", { value: p.partition }, `${p.partition} (${p.status})`)));
  }).catch(showError);

  function render() {
    tbody.replaceChildren(...records.map((r) => {
      const shown = preview(r.data, f.hex.checked);
      return h("tr", {}, h("td", { class: "num" }, r.seq), h("td", {}, fmtTime(r.timestamp_ms)),
        h("td", {}, r.partition_key ?? h("span", { class: "muted" }, "–")),
        h("td", {}, h("pre", { class: `data data-${shown.kind}`, title: shown.kind }, shown.text)));
    }));
  }

  async function read(more) {
    try {
      const query = more ? { cursor: next } : {
        partition: f.partition.value, cursor_type: f.type.value, seq: f.seq.hidden ? undefined : f.seq.value.trim(),
        timestamp: f.type.value === "AT_TIMESTAMP" && f.time.value ? Date.parse(f.time.value + "Z") : undefined };
      const page = await api(path, { query: { ...query, limit: f.limit.value } });
      records = page.records;
      next = page.next_cursor;
      document.getElementById("next-page").disabled = !next;
      status.textContent = `${records.length} records` + (records.length ? ` (seq ${records[0].seq} – ${records[records.length - 1].seq})` : "") +
        `, ${page.millis_behind_latest} ms behind latest`;
      render();
    } catch (err) { showError(err); }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); read(false); });
  return () => {};
}
