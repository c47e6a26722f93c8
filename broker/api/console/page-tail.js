// Live tail of one partition over the broker's SSE tail (/sluice/v1/tail), read with fetch() so
// the API key goes with it. "From now" starts at the partition's next sequence number as read
// when Start is pressed, so nothing written after the click is missed.

import { api, parseEvent, stream } from "./api.js";
import { preview } from "./decode.js";
import { fmtTime, h, showError } from "./ui.js";

const KEEP = 500;   // records kept on screen

export function mount(main, name) {
  // `mounted` is checked after every await: the page may have been left meanwhile (its elements
  // detached, nothing more to start). The buttons are held, not looked up in the document.
  let controller = null, shown = 0, mounted = true;
  const startButton = h("button", { type: "submit", id: "tail-start" }, "Start");
  const stopButton = h("button", { type: "button", class: "secondary", id: "tail-stop", disabled: true, onclick: () => stop("stopped") }, "Stop");
  const form = h("form", { class: "inline", id: "tail-form" },
    h("label", {}, "partition ", h("select", { name: "partition" })),
    h("label", {}, "from ", h("select", { name: "from" }, h("option", { value: "now" }, "now"),
      h("option", { value: "start" }, "the oldest record"))),
    startButton, stopButton);
  const status = h("p", { class: "muted", id: "tail-status" }, "Not tailing.");
  const tbody = h("tbody");
  main.append(h("h1", {}, "Live tail ", h("a", { href: `#/stream/${encodeURIComponent(name)}` }, name)), form, status,
    h("div", { class: "tail-log" }, h("table", { id: "tail" }, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Seq"),
      h("th", {}, "Time (UTC)"), h("th", {}, "Partition key"), h("th", {}, "Data"))), tbody)));
  const f = form.elements;

  api(`/streams/${encodeURIComponent(name)}`).then((d) => {
    if (!mounted) return;
    f.partition.replaceChildren(...d.partition_list.map((p) => h("option", { value: p.partition, "data-next": p.next_seq }, String(p.partition))));
  }).catch(showError);

  function stop(text) {
    if (controller) controller.abort();
    controller = null;
    startButton.disabled = false;
    stopButton.disabled = true;
    if (text) status.textContent = text;
  }

  function add(records) {
    for (const r of records) {
      const seen = preview(r.data);
      tbody.prepend(h("tr", {}, h("td", { class: "num" }, r.sequence_number), h("td", {}, fmtTime(r.timestamp)),
        h("td", {}, r.partition_key ?? "–"), h("td", {}, h("pre", { class: `data data-${seen.kind}` }, seen.text))));
      shown++;
    }
    while (tbody.rows.length > KEEP) tbody.lastChild.remove();
    status.textContent = `Tailing partition ${f.partition.value}: ${shown} records received.`;
  }

  async function start() {
    stop();
    shown = 0;
    tbody.replaceChildren();
    const partition = f.partition.value;
    const query = { "stream-name": name, "partition-id": partition, "max_wait_ms": 0 };
    if (f.from.value === "now") {   // the head as of now, read fresh
      const d = await api(`/streams/${encodeURIComponent(name)}`);
      if (!mounted) return;
      const p = d.partition_list.find((x) => String(x.partition) === partition);
      if (!p) throw new Error(`partition ${partition} is not in the stream any more`);
      Object.assign(query, { "cursor-type": "AT_SEQUENCE_NUMBER", "starting-sequence-number": p.next_seq });
    } else {
      query["cursor-type"] = "TRIM_HORIZON";
    }
    controller = new AbortController();
    startButton.disabled = true;
    stopButton.disabled = false;
    status.textContent = `Tailing partition ${partition} from sequence number ${query["starting-sequence-number"] ?? "of the oldest record"}…`;
    const mine = controller;
    try {
      await stream("/sluice/v1/tail", { query, signal: mine.signal, split: "\n\n", onItem: (text) => {
        const event = parseEvent(text);
        if (event.event === "records") add(JSON.parse(event.data).records);
        else if (event.event === "error") {
          const body = JSON.parse(event.data);
          showError({ reason: body.reason, message: body.error_msg || body.message });
        }
      } });
      if (mounted && controller === mine) stop("The tail ended.");
    } catch (err) {
      if (mounted && err.name !== "AbortError") { stop("The tail failed."); showError(err); }
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); start().catch(showError); });
  return () => { mounted = false; stop(); };
}
