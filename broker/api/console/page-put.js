// Put a record: its text (sent as UTF-8), routed by a partition key or to a partition id.

import { api } from "./api.js";
import { h, showError } from "./ui.js";

export function mount(main, name) {
  const result = h("p", { id: "put-result", class: "muted" });
  const form = h("form", { id: "put-form" },
    h("p", { class: "inline" },
      h("label", {}, "partition key ", h("input", { name: "key", size: 20, placeholder: "routes by hash" })),
      h("label", {}, " or partition id ", h("input", { name: "partition", size: 6, placeholder: "0" }))),
    h("textarea", { name: "data", rows: 8, placeholder: '{"hello": "world"}' }),
    h("p", {}, h("button", { type: "submit" }, "Put record")));
  main.append(h("h1", {}, "Put a record into ", h("a", { href: `#/stream/${encodeURIComponent(name)}` }, name)), form, result);
  const f = form.elements;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const key = f.key.value.trim(), partition = f.partition.value.trim();
      const stored = await api(`/streams/${encodeURIComponent(name)}/records`, { method: "POST", body: {
        data: f.data.value, partition_key: key || undefined, partition_id: partition || (key ? undefined : "0") } });
      result.textContent = `Stored in partition ${stored.partition} at sequence number ${stored.seq}.`;
    } catch (err) { showError(err); }
  });
  return () => {};
}
