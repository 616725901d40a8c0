// Collections: the list (polled, so status and lag stay live) and the form that creates one.

import { api } from "../api.js";
import { fmtAgo, fmtBytes, fmtInt, fmtMs, h, mount } from "../dom.js";
import { badgeOf, isLoading, problemOf, sourceOf } from "../status.js";
import { alertBox, badge, emptyState, errorAlert, field, linkButton, pageHeader, poll } from "../ui.js";

const LIST_POLL_MS = 2000;

export function collectionHref(c) {
  return `#/collections/${encodeURIComponent(c.workspace)}/${encodeURIComponent(c.name)}`;
}

function statusCell(collection) {
  const [label, tone] = badgeOf(collection);
  const problem = problemOf(collection);
  const cell = h("td", null, badge(label, tone));
  if (isLoading(collection) && !problem) {
    const bar = h("div", { class: "mini-progress-fill" });
    bar.style.width = `${sourceOf(collection).percent || 0}%`;
    cell.appendChild(h("div", { class: "mini-progress" }, bar));
  }
  if (problem) cell.appendChild(h("div", { class: "cell-note cell-note-bad", title: problem.message }, problem.message));
  return cell;
}

function collectionRow(c) {
  const source = sourceOf(c);
  const open = () => (location.hash = collectionHref(c));
  return h("tr", { class: "clickable", onclick: open, "data-collection": `${c.workspace}.${c.name}` },
    h("td", null,
      h("a", { class: "strong-link", href: collectionHref(c), onclick: (e) => e.stopPropagation() },
        h("span", { class: "ws" }, `${c.workspace}.`), c.name),
      c.description ? h("div", { class: "cell-note" }, c.description) : null),
    statusCell(c),
    h("td", { class: "num" }, fmtInt(c.stats?.doc_count)),
    h("td", { class: "num" }, fmtBytes(c.stats?.total_size)),
    h("td", { class: "num" }, fmtMs(c.stats?.sync_lag_ms)),
    h("td", null, h("div", null, source.table), h("div", { class: "cell-note" }, `${source.region} · via ${source.integration}`)),
    h("td", { class: "muted nowrap" }, fmtAgo(c.created_at)));
}

export function collectionsView(main) {
  const body = h("div", { class: "card" }, h("div", { class: "loading" }, "Loading collections…"));
  mount(main,
    pageHeader("Collections", "Each collection mirrors one DynamoDB table and follows its stream.",
      linkButton("New collection", "#/collections/new", "primary", "plus")),
    body);

  return poll(async (signal) => {
    let collections;
    try {
      collections = await api.collections({ signal });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      mount(body, errorAlert(error, "Could not list collections"));
      return;
    }
    if (!collections.length) {
      mount(body, emptyState("No collections yet",
        "Create one to load a DynamoDB table and keep it in sync; then query it with SQL.",
        linkButton("New collection", "#/collections/new", "primary", "plus")));
      return;
    }
    collections.sort((a, b) => `${a.workspace}.${a.name}`.localeCompare(`${b.workspace}.${b.name}`));
    mount(body, h("div", { class: "table-scroll" }, h("table", { class: "table" },
      h("thead", null, h("tr", null,
        h("th", null, "Name"), h("th", null, "Status"), h("th", { class: "num" }, "Documents"),
        h("th", { class: "num" }, "Size"), h("th", { class: "num" }, "Sync lag"), h("th", null, "Source table"),
        h("th", null, "Created"))),
      h("tbody", null, collections.map(collectionRow)))));
  }, LIST_POLL_MS);
}

// ------------------------------------------------------------------ new collection

function seconds(text) {
  const value = Number(text);
  return Number.isFinite(value) && value > 0 ? value : null;
}

export function newCollectionView(main) {
  const input = (attrs) => h("input", { type: "text", autocomplete: "off", spellcheck: "false", ...attrs });
  const workspace = input({ name: "workspace", value: "commons", required: true });
  const name = input({ name: "name", placeholder: "orders", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9_\\-]{0,99}" });
  const description = input({ name: "description", placeholder: "Optional" });
  const integration = h("select", { name: "integration", required: true });
  const table = input({ name: "table", placeholder: "orders", required: true });
  const region = input({ name: "region", value: "us-west-2", required: true });
  const useScan = h("input", { type: "radio", name: "bulk", value: "scan", checked: true });
  const useExport = h("input", { type: "radio", name: "bulk", value: "export" });
  const rcu = h("input", { type: "number", name: "rcu", min: "1", step: "1", placeholder: "Automatic" });
  const pollSeconds = h("input", { type: "number", name: "poll", min: "0.01", max: "600", step: "any", value: "0.2" });
  const mapping = h("textarea", { name: "field_mapping", rows: "3", spellcheck: "false", class: "code-input",
    placeholder: "SELECT * EXCEPT (email), SHA256(email) AS email_hash FROM _input" });
  const bucketNote = h("p", { class: "hint" });
  const requestLine = h("p", { class: "request-line" });
  const preview = h("pre", { class: "code-preview" });
  const message = h("div");
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Create collection");
  let integrations = [];

  const body = () => {
    const dynamodb = { table_name: table.value.trim(), aws_region: region.value.trim(), use_scan_api: useScan.checked };
    if (useScan.checked && rcu.value) dynamodb.rcu = Number(rcu.value);
    const poll = seconds(pollSeconds.value);
    if (poll !== null) dynamodb.settings = { dynamodb_stream_poll_frequency: `PT${poll}S` };
    const request = { name: name.value.trim(), sources: [{ integration_name: integration.value, dynamodb }] };
    if (description.value.trim()) request.description = description.value.trim();
    if (mapping.value.trim()) request.field_mapping_query = { sql: mapping.value.trim() };
    return request;
  };
  const refresh = () => {
    rcu.disabled = !useScan.checked;
    const chosen = integrations.find((i) => i.name === integration.value);
    bucketNote.textContent = useExport.checked && chosen && !chosen.dynamodb?.s3_export_bucket_name
      ? `Integration "${chosen.name}" names no S3 export bucket; the export needs one.`
      : "";
    mount(requestLine, h("b", null, "POST"), `/v1/orgs/self/ws/${workspace.value.trim() || "…"}/collections`);
    preview.textContent = JSON.stringify(body(), null, 2);
  };

  const form = h("form", { class: "card form", oninput: refresh, onchange: refresh, onsubmit: async (event) => {
    event.preventDefault();
    submit.disabled = true;
    mount(message);
    try {
      const created = await api.createCollection(workspace.value.trim(), body());
      location.hash = collectionHref(created);
    } catch (error) {
      mount(message, errorAlert(error, "The collection was not created"));
      submit.disabled = false;
    }
  } },
    message,
    h("fieldset", null, h("legend", null, "Collection"),
      h("div", { class: "row" },
        field("Workspace", workspace),
        field("Name", name, "Letters, digits, - and _. Queried as workspace.name.")),
      field("Description", description)),
    h("fieldset", null, h("legend", null, "Source table"),
      field("Integration", integration, "How Shoal reaches the AWS account."),
      h("div", { class: "row" },
        field("DynamoDB table", table, "Needs a stream with NEW_AND_OLD_IMAGES."),
        field("AWS region", region))),
    h("fieldset", null, h("legend", null, "Initial load"),
      h("label", { class: "choice" }, useScan,
        h("span", null, h("strong", null, "Parallel Scan"), h("span", { class: "hint" }, "Reads the table directly, never above the read budget."))),
      h("div", { class: "indent" }, field("Read budget (RCU per second)", rcu,
        "Empty: chosen from the table's provisioned capacity.")),
      h("label", { class: "choice" }, useExport,
        h("span", null, h("strong", null, "Export to S3"), h("span", { class: "hint" }, "Uses no table capacity; needs point-in-time recovery and the integration's export bucket."))),
      bucketNote),
    h("fieldset", null, h("legend", null, "Change stream"),
      h("p", { class: "hint" }, "After the load, Shoal follows the table's DynamoDB stream."),
      field("Poll every (seconds)", pollSeconds)),
    h("fieldset", null, h("legend", null, "Field mapping"),
      field("Transform each document (SQL, optional)", mapping,
        "Runs on every batch before indexing; the documents are the table _input.")),
    h("div", { class: "form-actions" }, linkButton("Cancel", "#/collections"), submit));

  mount(main,
    pageHeader("New collection", "Load a DynamoDB table, then keep it in sync from its stream.",
      linkButton("Back", "#/collections", "ghost", "back")),
    h("div", { class: "form-layout" }, form,
      h("aside", { class: "card side-card" }, h("h3", null, "API request"), h("p", { class: "hint" }, "What this form sends."), requestLine, preview)));

  api.integrations().then((list) => {
    integrations = list;
    mount(integration, list.map((i) => h("option", { value: i.name }, i.name)));
    if (!list.length) {
      form.prepend(alertBox("warn", "No integration yet",
        [h("a", { href: "#/integrations/new" }, "Create an integration"), " first: it tells Shoal how to reach your AWS account."]));
      submit.disabled = true;
    }
    refresh();
  }, (error) => mount(message, errorAlert(error, "Could not list integrations")));
  refresh();
}
