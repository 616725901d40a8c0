// The SQL editor: query with parameters, run with Ctrl+Enter, results page by page, errors
// pointed at where the query went wrong, and this browser's query history.

import { api } from "../api.js";
import { fmtAgo, fmtInt, fmtMs, h, icon, mount } from "../dom.js";
import { createEditor, placeholders } from "../editor.js";
import { alertBox, button, pageHeader } from "../ui.js";

const HISTORY_KEY = "shoal.queryHistory";
const DRAFT_KEY = "shoal.queryDraft";
const HISTORY_SIZE = 50;
const PAGE_SIZE = 50;
const PARAMETER_TYPES = ["string", "int", "float", "bool", "date", "time", "datetime", "timestamp"];
const ROW_LIMITS = [100, 1000, 10000, 100000, 1000000];
const INLINE_JSON_CHARS = 60;

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save(key, value) {
  localStorage.setItem(key, JSON.stringify(value));
}

/** Open the editor on `sql` (e.g. from a collection's page). */
export function openInEditor(sql) {
  save(DRAFT_KEY, { sql, parameters: [], rowLimit: load(DRAFT_KEY, {}).rowLimit });
  location.hash = "#/query";
}

function remember(entry) {
  const history = load(HISTORY_KEY, []).filter((e) => e.sql !== entry.sql || JSON.stringify(e.parameters) !== JSON.stringify(entry.parameters));
  history.unshift(entry);
  save(HISTORY_KEY, history.slice(0, HISTORY_SIZE));
}

// ------------------------------------------------------------------ values

/** JSON pretty-printed as coloured spans (text nodes only). */
function jsonTree(value, indent = "") {
  if (value === null) return h("span", { class: "v-null" }, "null");
  if (typeof value === "string") return h("span", { class: "v-string" }, JSON.stringify(value));
  if (typeof value === "number") return h("span", { class: "v-number" }, String(value));
  if (typeof value === "boolean") return h("span", { class: "v-bool" }, String(value));
  const inner = `${indent}  `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return ["[\n", value.flatMap((v, i) => [inner, jsonTree(v, inner), i < value.length - 1 ? ",\n" : "\n"]), indent, "]"];
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return ["{\n", entries.flatMap(([k, v], i) =>
    [inner, h("span", { class: "v-key" }, JSON.stringify(k)), ": ", jsonTree(v, inner), i < entries.length - 1 ? ",\n" : "\n"]), indent, "}"];
}

function cellValue(value) {
  if (value === null || value === undefined) return h("span", { class: "v-null" }, "null");
  if (typeof value === "number") return h("span", { class: "v-number" }, String(value));
  if (typeof value === "boolean") return h("span", { class: "v-bool" }, String(value));
  if (typeof value === "string") return h("span", { class: "v-string-cell", title: value.length > 80 ? value : null }, value);
  // Objects and arrays: compact on one line; click for the whole value, indented.
  const compact = JSON.stringify(value);
  const short = compact.length > INLINE_JSON_CHARS ? `${compact.slice(0, INLINE_JSON_CHARS)}…` : compact;
  const holder = h("div", { class: "v-nested" });
  const collapse = () => mount(holder, h("button", { type: "button", class: "json-inline", title: "Show the whole value",
    onclick: expand }, short));
  const expand = () => mount(holder, h("button", { type: "button", class: "json-close", onclick: collapse }, "collapse"),
    h("pre", { class: "json-tree" }, jsonTree(value)));
  collapse();
  return holder;
}

function columnsOf(result) {
  if (result.column_fields?.length) return result.column_fields.map((f) => ({ name: f.name, type: f.type }));
  const names = [];
  for (const row of result.results) for (const k of Object.keys(row)) if (!names.includes(k)) names.push(k);
  return names.map((name) => ({ name, type: "" }));
}

function resultsTable(columns, rows, firstRowNumber) {
  return h("div", { class: "results-scroll" }, h("table", { class: "table results-table" },
    h("thead", null, h("tr", null, h("th", { class: "rownum" }, "#"),
      columns.map((c) => h("th", null, h("span", null, c.name), c.type ? h("span", { class: "col-type" }, c.type) : null)))),
    h("tbody", null, rows.map((row, i) => h("tr", null, h("td", { class: "rownum" }, String(firstRowNumber + i)),
      columns.map((c) => h("td", { class: typeof row[c.name] === "number" ? "num" : null }, cellValue(row[c.name]))))))));
}

/**
 * A result the server keeps and serves page by page (`sql.paginate`): pages already seen
 * are cached, the next one is fetched with the cursor the previous one gave.
 */
class PagedResult {
  constructor(answer) {
    this.queryId = answer.query_id;
    this.total = answer.results_total_doc_count;
    this.columns = columnsOf(answer);
    this.stats = answer.stats;
    this.pages = [answer.results];
    this.nextCursors = [answer.pagination?.next_cursor ?? null];
  }

  get pageCount() {
    return Math.max(1, Math.ceil(this.total / PAGE_SIZE));
  }

  async page(index) {
    while (this.pages.length <= index) {
      const cursor = this.nextCursors[this.pages.length - 1];
      if (cursor === null) break;
      const next = await api.queryPage(this.queryId, cursor, PAGE_SIZE);
      this.pages.push(next.results);
      this.nextCursors.push(next.pagination?.next_cursor ?? null);
    }
    return this.pages[Math.min(index, this.pages.length - 1)];
  }
}

// ------------------------------------------------------------------ errors

const LOCATION = /\(line (\d+), column (\d+)\)\s*$/;
const NEAR = /near '((?:[^']|'')*)'/;

function queryErrorView(error, sql, editor) {
  const where = error.message.match(LOCATION);
  if (!where) return alertBox("error", "Query failed", error.message, error.status ? `${error.status} ${error.type}` : null);
  const line = Number(where[1]);
  const column = Number(where[2]);
  const near = error.message.match(NEAR)?.[1] || "";
  editor.markError(line, column, near.length);
  const text = sql.split("\n")[line - 1] ?? "";
  const caretStart = Math.max(0, column - Math.max(1, near.length));
  const excerpt = h("pre", { class: "error-excerpt" },
    h("span", { class: "excerpt-line" }, `${line} │ `), text, "\n",
    h("span", { class: "excerpt-line" }, `${" ".repeat(String(line).length)} │ `),
    h("span", { class: "excerpt-caret" }, `${" ".repeat(caretStart)}${"^".repeat(Math.max(1, near.length))}`));
  return h("div", { class: "alert alert-error", role: "alert" },
    icon("alert", "icon alert-icon"),
    h("div", { class: "alert-body" },
      h("strong", null, `Error at line ${line}, column ${column}`),
      h("p", { class: "alert-message" }, error.message.replace(LOCATION, "").trim()),
      excerpt,
      h("button", { type: "button", class: "link", onclick: () => editor.revealError() }, "Show in editor")));
}

// ------------------------------------------------------------------ view

export function queryView(main) {
  const draft = load(DRAFT_KEY, {});
  let parameters = draft.parameters || [];
  let rowLimit = draft.rowLimit || 10000;
  let runNumber = 0;
  let shown = null; // the PagedResult on screen; a page arriving for an older one is dropped
  const saveDraft = () => save(DRAFT_KEY, { sql: editor.value, parameters, rowLimit });

  const paramList = h("div", { class: "params" });
  const resultsHead = h("div", { class: "results-head" });
  const resultsBody = h("div", { class: "results-body" },
    h("div", { class: "empty small" }, h("p", null, "Run a query to see results here.")));
  const historyList = h("ol", { class: "history" });
  const collectionList = h("ul", { class: "collection-list" });
  const runButton = h("button", { type: "button", class: "btn btn-primary", onclick: () => run() },
    icon("play"), "Run", h("kbd", null, navigator.platform.startsWith("Mac") ? "⌘↵" : "Ctrl ↵"));
  const limitSelect = h("select", { class: "compact", "aria-label": "Row limit", onchange: () => {
    rowLimit = Number(limitSelect.value);
    saveDraft();
  } }, ROW_LIMITS.map((n) => h("option", { value: String(n), selected: n === rowLimit }, `${fmtInt(n)} rows max`)));

  const editor = createEditor({
    value: draft.sql ?? "SELECT *\nFROM commons.orders\nLIMIT 100",
    onRun: () => run(),
    onChange: () => {
      addMissingParameters();
      markUnusedParameters();
      saveDraft();
    },
  });

  // ---- parameters

  function addMissingParameters() {
    const missing = placeholders(editor.value).filter((name) => !parameters.some((p) => p.name === name));
    if (!missing.length) return;
    parameters = [...parameters, ...missing.map((name) => ({ name, type: "string", value: "" }))];
    renderParameters();
  }

  /** Dim the parameters the query no longer uses (kept: the user may be mid-edit). */
  function markUnusedParameters() {
    const used = placeholders(editor.value);
    for (const el of paramList.querySelectorAll(".param")) el.classList.toggle("param-unused", !used.includes(el.dataset.param));
  }

  function renderParameters() {
    const used = placeholders(editor.value);
    mount(paramList, parameters.map((p, i) => {
      const update = (key) => (event) => {
        parameters[i] = { ...parameters[i], [key]: event.target.value };
        saveDraft();
      };
      return h("div", { class: `param${used.includes(p.name) ? "" : " param-unused"}`, "data-param": p.name },
        h("span", { class: "param-colon" }, ":"),
        h("input", { class: "param-name", value: p.name, "aria-label": "Parameter name", placeholder: "name",
          oninput: update("name"), onchange: renderParameters }),
        h("select", { class: "compact", "aria-label": "Parameter type", onchange: update("type") },
          PARAMETER_TYPES.map((t) => h("option", { value: t, selected: t === p.type }, t))),
        h("input", { class: "param-value", value: p.value, "aria-label": `Value of :${p.name}`, placeholder: "value",
          oninput: update("value") }),
        h("button", { type: "button", class: "icon-btn", title: "Remove", "aria-label": `Remove :${p.name}`, onclick: () => {
          parameters = parameters.filter((_, j) => j !== i);
          saveDraft();
          renderParameters();
        } }, "×"));
    }),
    h("button", { type: "button", class: "link", onclick: () => {
      parameters = [...parameters, { name: "", type: "string", value: "" }];
      renderParameters();
    } }, "+ Add parameter"));
  }

  // ---- history

  function renderHistory() {
    const history = load(HISTORY_KEY, []);
    if (!history.length) {
      mount(historyList, h("li", { class: "muted small" }, "Queries you run appear here."));
      return;
    }
    mount(historyList, history.map((entry) => h("li", null,
      h("button", { type: "button", class: "history-item", title: entry.sql, onclick: () => {
        parameters = entry.parameters || [];
        editor.value = entry.sql;
        renderParameters();
        editor.focus();
      } },
        h("code", null, entry.sql.replace(/\s+/g, " ").trim()),
        h("span", { class: `history-meta${entry.error ? " history-failed" : ""}` },
          entry.error ? "failed" : `${fmtInt(entry.rows)} ${entry.rows === 1 ? "row" : "rows"} · ${fmtMs(entry.elapsedMs)}`, " · ", fmtAgo(entry.at))))));
  }

  // ---- running

  async function showResults(result, roundTripMs, page = 0) {
    let rows;
    try {
      rows = await result.page(page);
      if (result !== shown) return;
    } catch (error) {
      mount(resultsBody, alertBox("error", "Could not fetch this page", error.message));
      return;
    }
    const total = result.total;
    const first = total ? page * PAGE_SIZE + 1 : 0;
    const last = Math.min(total, page * PAGE_SIZE + rows.length);
    mount(resultsHead,
      h("div", { class: "results-summary", "data-testid": "results-summary" },
        h("span", { class: "ok-dot" }), h("strong", null, `${fmtInt(total)} ${total === 1 ? "row" : "rows"}`),
        h("span", { class: "muted" }, ` in ${fmtMs(result.stats?.elapsed_time_ms)} on the server · ${fmtMs(roundTripMs)} total`),
        total >= rowLimit ? h("span", { class: "warn-text" }, ` · stopped at the ${fmtInt(rowLimit)}-row limit`) : null),
      total > PAGE_SIZE ? h("div", { class: "pager" },
        button("‹", { onclick: () => showResults(result, roundTripMs, page - 1), disabled: page === 0, "aria-label": "Previous page" }),
        h("span", { class: "muted" }, `${fmtInt(first)}–${fmtInt(last)} of ${fmtInt(total)}`),
        button("›", { onclick: () => showResults(result, roundTripMs, page + 1), disabled: page >= result.pageCount - 1,
          "aria-label": "Next page" })) : null);
    mount(resultsBody, total ? resultsTable(result.columns, rows, first) : h("div", { class: "empty small" }, h("p", null, "The query returned no rows.")));
  }

  async function run() {
    const sql = editor.value;
    if (!sql.trim()) return;
    const thisRun = ++runNumber;
    shown = null;
    const sent = parameters.filter((p) => p.name).map((p) => ({ name: p.name, type: p.type, value: String(p.value) }));
    editor.clearError();
    runButton.disabled = true;
    mount(resultsHead, h("div", { class: "results-summary muted" }, h("span", { class: "spinner" }), "Running…"));
    const started = performance.now();
    try {
      const answer = await api.query({ sql: { query: sql, parameters: sent, default_row_limit: rowLimit,
        paginate: true, initial_paginate_response_doc_count: PAGE_SIZE } });
      if (thisRun !== runNumber) return;
      const result = (shown = new PagedResult(answer));
      await showResults(result, performance.now() - started);
      remember({ sql, parameters, at: new Date().toISOString(), rows: result.total, elapsedMs: result.stats?.elapsed_time_ms });
    } catch (error) {
      if (thisRun !== runNumber) return;
      mount(resultsHead, h("div", { class: "results-summary" }, h("span", { class: "bad-dot" }), h("strong", null, "Failed"),
        h("span", { class: "muted" }, ` after ${fmtMs(performance.now() - started)}`)));
      mount(resultsBody, queryErrorView(error, sql, editor));
      remember({ sql, parameters, at: new Date().toISOString(), error: error.message });
    } finally {
      if (thisRun === runNumber) runButton.disabled = false;
      renderHistory();
    }
  }

  // ---- layout

  mount(main,
    pageHeader("SQL editor", "Query any collection as workspace.collection; bind values as :name."),
    h("div", { class: "query-layout" },
      h("div", { class: "query-main" },
        h("section", { class: "card flush editor-card" },
          editor.el,
          h("div", { class: "editor-bar" },
            h("div", { class: "params-wrap" }, paramList),
            h("div", { class: "run-controls" }, limitSelect, runButton))),
        h("section", { class: "card flush results-card" }, resultsHead, resultsBody)),
      h("aside", { class: "query-side" },
        h("section", { class: "card side-card" }, h("h3", null, "Collections"), collectionList),
        h("section", { class: "card side-card" },
          h("div", { class: "side-head" }, h("h3", null, icon("history"), "History"),
            h("button", { type: "button", class: "link", onclick: () => {
              save(HISTORY_KEY, []);
              renderHistory();
            } }, "Clear")),
          historyList))));

  renderParameters();
  addMissingParameters();
  renderHistory();
  api.collections().then((collections) => {
    if (!collections.length) {
      mount(collectionList, h("li", { class: "muted small" }, "No collections yet."));
      return;
    }
    mount(collectionList, collections.map((c) => h("li", null,
      h("button", { type: "button", class: "collection-chip", title: `Insert ${c.workspace}.${c.name}`,
        onclick: () => editor.insert(`${c.workspace}.${c.name}`) },
        h("span", { class: "ws" }, `${c.workspace}.`), c.name,
        h("span", { class: "muted small" }, ` ${fmtInt(c.stats?.doc_count)}`)))));
  }, () => mount(collectionList, h("li", { class: "muted small" }, "Could not list collections.")));
  editor.focus();
}
