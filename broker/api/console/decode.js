// A record's payload (base64 from the API) shown as pretty JSON, text or hex.

export function bytesOf(b64) {
  const raw = atob(b64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

export function hex(bytes) {
  const lines = [];
  for (let at = 0; at < bytes.length; at += 16) {
    const row = bytes.subarray(at, at + 16);
    const hexes = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const text = Array.from(row, (b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${at.toString(16).padStart(6, "0")}  ${hexes.padEnd(47)}  ${text}`);
  }
  return lines.join("\n");
}

// {kind: "json" | "text" | "binary", text}
export function preview(b64, asHex = false) {
  const bytes = bytesOf(b64);
  if (asHex) return { kind: "hex", text: hex(bytes) };
  let text;
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch {
    return { kind: "binary", text: hex(bytes) };
  }
  const trimmed = text.trim();
  if (trimmed.startsWith("{") || trimmed.startsWith("[")) {
    try { return { kind: "json", text: JSON.stringify(JSON.parse(trimmed), null, 2) }; } catch { /* text */ }
  }
  return { kind: "text", text };
}
