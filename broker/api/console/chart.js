// A small line chart on <canvas>: series of numbers (newest last), a shared y scale from 0.
// COLOURS[i] is also the class swatch-i in style.css (the page has no inline styles: CSP).

const COLOURS = ["#2357c6", "#d9480f", "#067647", "#7a5af8", "#c11574", "#0e9384", "#b54708", "#475467"];

export function lineChart(canvas, series, { label = "" } = {}) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, hgt = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio;
  canvas.height = hgt * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, hgt);
  const max = Math.max(1, ...series.flat());
  canvas.dataset.max = String(max);   // the scale drawn (read by the tests)
  const n = Math.max(2, ...series.map((s) => s.length));
  ctx.strokeStyle = "#d9dee7";
  ctx.beginPath();
  ctx.moveTo(0, hgt - 0.5);
  ctx.lineTo(w, hgt - 0.5);
  ctx.stroke();
  series.forEach((values, i) => {
    ctx.strokeStyle = COLOURS[i % COLOURS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, j) => {
      const x = ((j + n - values.length) / (n - 1)) * (w - 2) + 1;
      const y = hgt - 2 - (v / max) * (hgt - 14);
      j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  ctx.fillStyle = "#667085";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(`${label} max ${max >= 100 ? Math.round(max) : max.toFixed(1)}`, 4, 11);
}

export { COLOURS };
