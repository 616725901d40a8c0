// The SQL editor: a plain <textarea> (so typing, undo and selection are the browser's own)
// over a mirror that shows the same text coloured, with line numbers and the error marked.
// Both use the same monospace metrics and `white-space: pre`, so their characters line up.

import { h, mount } from "./dom.js";

const KEYWORDS = new Set(`select from where group by order limit offset as and or not in is null join left right
inner outer full cross on using having distinct union all with case when then else end asc desc like ilike
between exists true false cast over partition unnest search contains phrase score interval except intersect
values lateral filter nulls first last`.split(/\s+/));

// One alternative per token class; the sticky flag makes the scan consume the text in order.
const TOKEN = /(--[^\n]*|\/\*[\s\S]*?(?:\*\/|$))|('(?:[^']|'')*'?)|("(?:[^"]|"")*"?)|(::)|(:[A-Za-z_]\w*)|(\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b)|([A-Za-z_]\w*)|([\s\S])/gy;
const CLASSES = ["comment", "string", "ident-quoted", "op", "param", "number", "word", "op"];

function tokens(text) {
  const out = [];
  TOKEN.lastIndex = 0;
  let match;
  while (TOKEN.lastIndex < text.length && (match = TOKEN.exec(text))) {
    const group = match.slice(1).findIndex((g) => g !== undefined);
    let cls = CLASSES[group];
    if (cls === "word") {
      if (KEYWORDS.has(match[0].toLowerCase())) cls = "keyword";
      else if (text[TOKEN.lastIndex] === "(") cls = "function";
      else cls = "";
    }
    if (/^\s+$/.test(match[0])) cls = "";
    out.push({ text: match[0], start: match.index, cls });
  }
  return out;
}

/** The parameters (`:name`) a query uses, in order, outside strings and comments. */
export function placeholders(text) {
  const names = [];
  for (const t of tokens(text)) if (t.cls === "param" && !names.includes(t.text.slice(1))) names.push(t.text.slice(1));
  return names;
}

/** Offset of (line, column), both 1-based, in `text`. */
function offsetOf(text, line, column) {
  const lines = text.split("\n");
  let offset = 0;
  for (let i = 0; i < Math.min(line - 1, lines.length); i++) offset += lines[i].length + 1;
  return offset + Math.max(0, column - 1);
}

export function createEditor({ value, onRun, onChange }) {
  const textarea = h("textarea", { class: "editor-input", spellcheck: "false", autocomplete: "off",
    autocapitalize: "off", wrap: "off", "aria-label": "SQL query", placeholder: "SELECT * FROM commons.orders LIMIT 10" });
  textarea.value = value;
  const mirror = h("pre", { class: "editor-mirror", "aria-hidden": "true" });
  const gutter = h("div", { class: "editor-gutter", "aria-hidden": "true" });
  const el = h("div", { class: "editor" }, gutter, h("div", { class: "editor-code" }, mirror, textarea));
  let error = null; // {line, start, end}: offsets of the marked range

  const paint = () => {
    const text = textarea.value;
    const lineCount = text.split("\n").length;
    mount(gutter, Array.from({ length: lineCount }, (_, i) =>
      h("div", { class: error && error.line === i + 1 ? "gutter-line gutter-error" : "gutter-line" }, String(i + 1))));
    const parts = [];
    for (const t of tokens(text)) {
      // Split tokens at the error range so it can be underlined exactly.
      const cuts = [t.start, t.start + t.text.length];
      if (error) for (const c of [error.start, error.end]) if (c > cuts[0] && c < cuts[1]) cuts.splice(-1, 0, c);
      for (let i = 0; i + 1 < cuts.length; i++) {
        const piece = text.slice(cuts[i], cuts[i + 1]);
        const marked = error && cuts[i] >= error.start && cuts[i] < error.end;
        const cls = [t.cls && `tok-${t.cls}`, marked && "tok-error"].filter(Boolean).join(" ");
        parts.push(cls ? h("span", { class: cls }, piece) : piece);
      }
    }
    if (error && error.start >= text.length) parts.push(h("span", { class: "tok-error" }, " "));
    mount(mirror, parts, "\n ");
    syncScroll();
  };
  const syncScroll = () => {
    mirror.scrollTop = gutter.scrollTop = textarea.scrollTop;
    mirror.scrollLeft = textarea.scrollLeft;
  };

  textarea.addEventListener("input", () => {
    error = null;
    paint();
    onChange(textarea.value);
  });
  textarea.addEventListener("scroll", syncScroll);
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      onRun();
    }
  });
  paint();

  return {
    el,
    get value() {
      return textarea.value;
    },
    set value(text) {
      textarea.value = text;
      error = null;
      paint();
      onChange(text);
    },
    focus: () => textarea.focus(),
    /** Insert text at the cursor, as if typed. */
    insert(text) {
      textarea.focus();
      textarea.setRangeText(text, textarea.selectionStart, textarea.selectionEnd, "end");
      textarea.dispatchEvent(new Event("input"));
    },
    /** Underline `length` characters ending at (line, column) and put the cursor there. */
    markError(line, column, length) {
      const text = textarea.value;
      const end = Math.min(text.length + 1, offsetOf(text, line, column) + 1);
      error = { line, start: Math.max(0, end - Math.max(1, length)), end };
      paint();
    },
    revealError() {
      if (!error) return;
      textarea.focus();
      textarea.setSelectionRange(error.start, Math.min(error.end, textarea.value.length));
    },
    clearError() {
      error = null;
      paint();
    },
  };
}
