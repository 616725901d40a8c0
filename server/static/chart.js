// A small time-series line chart on <canvas>: the last few minutes of one measure.

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  const fraction = raw / power;
  return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * power;
}

function cssVar(el, name) {
  return getComputedStyle(el).getPropertyValue(name).trim();
}

const MIN_SPAN_MS = 60_000;
const TIME_TICKS_S = [10, 15, 30, 60, 120];

export class TimeChart {
  /** format(v) labels the y axis; windowMs is how much history is shown; the y axis
   * reaches at least minTop, so a flat line at zero still has a readable scale. */
  constructor(canvas, { color, format, windowMs, minTop }) {
    this.canvas = canvas;
    this.minTop = minTop;
    this.color = color;
    this.format = format;
    this.windowMs = windowMs;
    this.samples = [];
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(canvas);
  }

  update(samples) {
    this.samples = samples;
    this.draw();
  }

  dispose() {
    this.resize.disconnect();
  }

  draw() {
    const { canvas } = this;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const grid = cssVar(canvas, "--chart-grid") || "#e5e7eb";
    const text = cssVar(canvas, "--chart-text") || "#6b7280";
    const color = cssVar(canvas, this.color) || "#2563eb";
    ctx.font = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";

    // The x axis spans the samples there are (at least a minute), up to windowMs.
    const now = Date.now();
    const oldest = this.samples.length ? this.samples[0].t : now;
    const span = Math.min(this.windowMs, Math.max(MIN_SPAN_MS, now - oldest));
    const start = now - span;
    const points = this.samples.filter((p) => p.t >= start && p.v !== null && isFinite(p.v));
    const maxValue = Math.max(this.minTop, ...points.map((p) => p.v));
    const step = niceStep(maxValue / 4);
    const top = Math.ceil(maxValue / step) * step;
    const ticks = Array.from({ length: Math.round(top / step) + 1 }, (_, i) => i * step);

    const labelWidth = Math.max(...ticks.map((v) => ctx.measureText(this.format(v)).width));
    const plot = { left: Math.ceil(labelWidth) + 12, right: width - 8, top: 8, bottom: height - 22 };
    const x = (t) => plot.left + ((t - start) / span) * (plot.right - plot.left);
    const y = (v) => plot.bottom - (v / top) * (plot.bottom - plot.top);

    // Grid and axis labels.
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = text;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const value of ticks) {
      const py = Math.round(y(value)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(plot.left, py);
      ctx.lineTo(plot.right, py);
      ctx.stroke();
      ctx.fillText(this.format(value), plot.left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const every = TIME_TICKS_S.find((s) => span / (s * 1000) <= 6) || TIME_TICKS_S[TIME_TICKS_S.length - 1];
    for (let ago = Math.floor(span / 1000 / every) * every; ago >= 0; ago -= every) {
      ctx.textAlign = ago === 0 ? "right" : "center";
      const label = ago === 0 ? "now" : ago % 60 === 0 ? `−${ago / 60} min` : `−${ago} s`;
      ctx.fillText(label, ago === 0 ? plot.right : x(now - ago * 1000), plot.bottom + 6);
    }

    if (points.length < 2) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("collecting samples…", (plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2);
      return;
    }

    // Area under the line, then the line, then the latest point.
    ctx.beginPath();
    ctx.moveTo(x(points[0].t), plot.bottom);
    for (const p of points) ctx.lineTo(x(p.t), y(p.v));
    ctx.lineTo(x(points[points.length - 1].t), plot.bottom);
    ctx.closePath();
    const fill = ctx.createLinearGradient(0, plot.top, 0, plot.bottom);
    fill.addColorStop(0, color + "40");
    fill.addColorStop(1, color + "05");
    ctx.fillStyle = fill;
    ctx.fill();

    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.stroke();

    const last = points[points.length - 1];
    ctx.beginPath();
    ctx.arc(x(last.t), y(last.v), 3.5, 0, 2 * Math.PI);
    ctx.fillStyle = color;
    ctx.fill();
  }
}
