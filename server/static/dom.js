// Building the page safely: every string becomes a text node, never markup, so document
// names and item values cannot inject HTML. Also the number, size and time formats.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(parent, child) {
  if (child === null || child === undefined || child === false) return;
  if (Array.isArray(child)) {
    for (const c of child) append(parent, c);
  } else if (child instanceof Node) {
    parent.appendChild(child);
  } else {
    parent.appendChild(document.createTextNode(String(child)));
  }
}

function setAttributes(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "value" || name === "checked" || name === "disabled" || name === "selected") {
      el[name] = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
}

/** h("div", {class: "x", onclick: f}, "text", child, [more]) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttributes(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element (icons, small charts); attributes and children as for h(). */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttributes(el, attrs);
  append(el, children);
  return el;
}

/** Replace the children of `el`. */
export function mount(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Icons: 20×20 outline paths, drawn with currentColor.
const ICONS = {
  collections: "M3 5.5C3 4.1 6.1 3 10 3s7 1.1 7 2.5S13.9 8 10 8 3 6.9 3 5.5Zm0 0v9C3 15.9 6.1 17 10 17s7-1.1 7-2.5v-9M3 10c0 1.4 3.1 2.5 7 2.5s7-1.1 7-2.5",
  integrations: "M8 12l4-4M6.5 9.5l-2 2a2.8 2.8 0 0 0 4 4l2-2M13.5 10.5l2-2a2.8 2.8 0 0 0-4-4l-2 2",
  query: "M4 4h12v12H4zM7 8l2 2-2 2M11 12h3",
  plus: "M10 4v12M4 10h12",
  trash: "M4 6h12M8 6V4h4v2M6 6l1 10h6l1-10",
  back: "M12 4l-6 6 6 6",
  logout: "M8 4H4v12h4M13 7l3 3-3 3M16 10H8",
  play: "M6 4l10 6-10 6z",
  alert: "M10 3l8 14H2zM10 8v4M10 14.5v.5",
  history: "M3 10a7 7 0 1 0 2-5M3 3v3h3M10 6v4l3 2",
  key: "M12.5 3a4.5 4.5 0 1 1-4.2 6.1L3 14.5V17h3v-2h2v-2l1.4-1.4A4.5 4.5 0 0 1 12.5 3Zm1 3.5h.01",
};

export function icon(name, cls = "icon") {
  return s("svg", { class: cls, viewBox: "0 0 20 20", "aria-hidden": "true" },
    s("path", { d: ICONS[name], fill: "none", stroke: "currentColor", "stroke-width": "1.6",
      "stroke-linecap": "round", "stroke-linejoin": "round" }));
}

// ------------------------------------------------------------------ formats

const INT = new Intl.NumberFormat("en-US");
const ONE_DECIMAL = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

export function fmtInt(n) {
  return n === null || n === undefined ? "—" : INT.format(n);
}

export function fmtRate(n) {
  if (n === null || n === undefined || !isFinite(n)) return "—";
  return n >= 100 ? INT.format(Math.round(n)) : ONE_DECIMAL.format(n);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 || n >= 100 ? INT.format(Math.round(n)) : ONE_DECIMAL.format(n)} ${units[i]}`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms < 10 ? ONE_DECIMAL.format(ms) : Math.round(ms)} ms`;
  if (ms < 60_000) return `${ONE_DECIMAL.format(ms / 1000)} s`;
  if (ms < 3_600_000) return `${ONE_DECIMAL.format(ms / 60_000)} min`;
  return `${ONE_DECIMAL.format(ms / 3_600_000)} h`;
}

export function fmtAgo(iso) {
  if (!iso) return "—";
  const ms = Date.now() - Date.parse(iso);
  if (!isFinite(ms)) return iso;
  if (ms < 5000) return "just now";
  if (ms < 60_000) return `${Math.floor(ms / 1000)} s ago`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)} min ago`;
  if (ms < 86_400_000) return `${Math.floor(ms / 3_600_000)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}
