// One stream: its partitions (status, hash ranges, sequence ranges, parents) and rate charts of
// records in and out, per partition, from the broker's cumulative counters sampled every second.
// Sequence numbers come as strings and are computed with as BigInt (exact past 2^53).

import { api } from "./api.js";
import { COLOURS, lineChart } from "./chart.js";
import { every, fmtNumber, fmtRate, fmtTime, h } from "./ui.js";

const POLL_MS = 1000;
const KEEP = 60;   // samples per chart

export function mount(main, name) {
  const path = `/streams/${encodeURIComponent(name)}`;
  const link = (where, text) => h("a", { href: `#/${where}/${encodeURIComponent(name)}` }, text);
  const info = h("div", { class: "cards" });
  const inChart = h("canvas", { width: 420, height: 120, id: "chart-in" });
  const outChart = h("canvas", { width: 420, height: 120, id: "chart-out" });
  const tbody = h("tbody");
  main.append(h("h1", {}, "Stream ", h("code", {}, name)),
    h("p", {}, link("browse", "browse records"), " · ", link("tail", "live tail"), " · ", link("put", "put a record")),
    info,
    h("div", { class: "charts" },
      h("div", { class: "chart" }, h("h3", {}, "records in / s, per partition"), inChart),
      h("div", { class: "chart" }, h("h3", {}, "records out / s, per partition"), outChart)),
    h("h2", {}, "Partitions"),
    h("table", { id: "partitions" }, h("thead", {}, h("tr", {}, h("th", {}, "Partition"), h("th", {}, "Status"),
      h("th", {}, "Hash range"), h("th", { class: "num" }, "First seq"), h("th", { class: "num" }, "Last seq"),
      h("th", { class: "num" }, "Records"), h("th", {}, "Parents"), h("th", { class: "num" }, "In rec/s"),
      h("th", { class: "num" }, "Out rec/s"), h("th", {}, "Last write (UTC)"))), tbody));

  let last = null;
  const history = { in: [], out: [] };   // per partition: arrays of rates

  function rates(now, counts, key) {
    if (!last) return counts.map(() => null);
    const dt = (now - last.at) / 1000;
    return counts.map((c, i) => Math.max(0, (c - (last[key][i] || 0)) / dt));
  }

  async function refresh() {
    const d = await api(path);
    const now = performance.now();
    const inRate = rates(now, d.counters.put_records, "put");
    const outRate = rates(now, d.counters.get_records, "get");
    last = { at: now, put: d.counters.put_records, get: d.counters.get_records };
    for (const [key, values] of [["in", inRate], ["out", outRate]]) {
      values.forEach((v, i) => {
        const series = history[key][i] || (history[key][i] = []);
        if (v !== null) series.push(v);
        if (series.length > KEEP) series.shift();
      });
    }
    info.replaceChildren(
      h("div", { class: "card" }, "Partitions", h("b", {}, `${d.partitions} active`), d.readable_partitions > d.partitions ? `${d.readable_partitions - d.partitions} closed` : ""),
      h("div", { class: "card" }, "Retention", h("b", {}, `${d.retention_hours} h`)),
      h("div", { class: "card" }, "Data type", h("b", {}, d.columns ? "typed" : d.data_type)),
      h("div", { class: "card" }, "Created (UTC)", h("b", {}, fmtTime(d.created_ms))),
      h("div", { class: "card" }, "Scale events", h("b", {}, d.scale_events)),
      d.columns ? h("div", { class: "card", id: "columns" }, "Columns",
        h("b", {}, d.columns.map(([col, type]) => `${col} ${type}`).join(", "))) : "");
    lineChart(inChart, history.in, { label: "rec/s" });
    lineChart(outChart, history.out, { label: "rec/s" });
    tbody.replaceChildren(...d.partition_list.map((p) => h("tr", {},
      h("td", {}, h("span", { class: `swatch swatch-${p.partition % COLOURS.length}` }, "■ "), p.partition),
      h("td", { class: `status-${p.status}` }, p.status),
      h("td", {}, h("code", {}, `${p.hash_range[0]} – ${p.hash_range[1]}`)),
      h("td", { class: "num" }, p.first_seq),
      h("td", { class: "num" }, BigInt(p.next_seq) > BigInt(p.first_seq) ? String(BigInt(p.next_seq) - 1n) : "–"),
      h("td", { class: "num" }, fmtNumber(String(BigInt(p.next_seq) - BigInt(p.first_seq)))),
      h("td", {}, p.parents.join(", ") || "–"),
      h("td", { class: "num" }, fmtRate(inRate[p.partition])),
      h("td", { class: "num" }, fmtRate(outRate[p.partition])),
      h("td", {}, fmtTime(p.last_ts)))));
    if (d.has_more_partitions) tbody.append(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "more partitions not shown")));
  }

  return every(POLL_MS, refresh);
}
