// One collection, live: bulk-load progress, ingest rate and sync lag over the last minutes,
// and what went wrong if something did. The status is polled every second.

import { api } from "../api.js";
import { TimeChart } from "../chart.js";
import { fmtAgo, fmtBytes, fmtInt, fmtMs, fmtRate, fmtTime, h, mount } from "../dom.js";
import { achievedRcu, badgeOf, countsStreamRecords, isLoading, problemOf, rcuBudget, sourceOf } from "../status.js";
import { alertBox, badge, button, confirmDialog, errorAlert, pageHeader, poll, toast } from "../ui.js";
import { openInEditor } from "./query.js";

const POLL_MS = 1000;
const WINDOW_MS = 5 * 60_000;
const THROTTLE_WINDOW_MS = 10_000; // throttled requests this recent are shown as a warning
// Samples per collection survive leaving the page, so coming back shows the recent past.
const samplesByCollection = new Map();
const STATE_NAMES = {
  INITIALIZING: "Starting",
  SCANNING: "Scanning the table",
  EXPORTING_TO_S3: "Exporting to S3",
  DOWNLOADING_FROM_S3: "Loading the S3 export",
  PROCESSING_STREAM: "Following the stream",
};

function record(key, collection) {
  const samples = samplesByCollection.get(key) || [];
  const { scan } = sourceOf(collection);
  const sample = {
    t: Date.now(),
    scanned: scan.scan_records_processed || 0,
    streamed: scan.stream_records_processed,
    docs: collection.stats?.doc_count || 0,
    lag: collection.stats?.sync_lag_ms ?? null,
    throttled: scan.scan_throttled_requests || 0,
    rate: null,
  };
  const previous = samples[samples.length - 1];
  if (previous) {
    const seconds = (sample.t - previous.t) / 1000;
    // Exact when the server counts stream records; otherwise scanned items, or net new documents.
    const items = countsStreamRecords(collection)
      ? sample.scanned - previous.scanned + (sample.streamed - (previous.streamed || 0))
      : Math.max(sample.scanned - previous.scanned, sample.docs - previous.docs, 0);
    sample.rate = seconds > 0 ? items / seconds : null;
  }
  samples.push(sample);
  while (samples.length && samples[0].t < sample.t - WINDOW_MS) samples.shift();
  samplesByCollection.set(key, samples);
  return samples;
}

/** Throttled scan requests in the last few seconds (the scan slows down to absorb them). */
function recentThrottling(samples) {
  const last = samples[samples.length - 1];
  const before = samples.find((s) => s.t >= last.t - THROTTLE_WINDOW_MS) || last;
  return last.throttled - before.throttled;
}

function budgetText(collection) {
  const budget = rcuBudget(collection);
  const chosen = sourceOf(collection).rcu === null;
  if (budget === null) return "budget chosen from the table";
  return `budget ${fmtInt(budget)} RCU/s${chosen ? " (chosen from the table)" : ""}`;
}

function stat(label, value, note) {
  return h("div", { class: "stat" }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value" }, value),
    note ? h("div", { class: "stat-note" }, note) : null);
}

function progressCard(collection, samples) {
  const source = sourceOf(collection);
  const percent = Math.max(0, Math.min(100, source.percent || 0));
  const recent = samples.slice(-5).filter((s) => s.rate !== null);
  const itemsPerSecond = recent.length ? recent.reduce((sum, s) => sum + s.rate, 0) / recent.length : null;
  const total = source.scan.scan_total_records;
  const remaining = total ? Math.max(0, total - (source.scan.scan_records_processed || 0)) : null;
  const eta = itemsPerSecond && remaining !== null ? (remaining / itemsPerSecond) * 1000 : null;
  const rcu = achievedRcu(collection);
  const fill = h("div", { class: "progress-fill" });
  fill.style.width = `${percent}%`;
  const phase = STATE_NAMES[source.state] || source.state;
  return h("section", { class: "card progress-card", "data-testid": "bulk-progress" },
    h("div", { class: "progress-head" },
      h("h2", null, "Initial load", h("span", { class: "muted" }, ` · ${phase}`)),
      h("span", { class: "progress-percent" }, `${percent.toFixed(1)}%`)),
    h("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
      "aria-valuenow": percent.toFixed(1) }, fill),
    h("div", { class: "progress-stats" },
      stat("Items loaded", fmtInt(source.scan.scan_records_processed), total ? `of about ${fmtInt(total)}` : null),
      stat("Items / s", fmtRate(itemsPerSecond)),
      source.useScan ? stat("Read capacity", rcu === null ? "—" : `${fmtRate(rcu)} RCU/s`, budgetText(collection)) : null,
      stat("Time left", eta === null ? "—" : `≈ ${fmtMs(eta)}`, source.scan.scan_start_time ? `started ${fmtAgo(source.scan.scan_start_time)}` : null)));
}

function detailsCard(collection) {
  const source = sourceOf(collection);
  const scan = source.scan;
  const loadTook = scan.scan_start_time && scan.scan_end_time
    ? fmtMs(Date.parse(scan.scan_end_time) - Date.parse(scan.scan_start_time)) : null;
  const rows = [
    ["Source table", `${source.table} (${source.region})`],
    ["Integration", source.integration],
    ["Initial load", source.useScan ? `Parallel Scan, ${budgetText(collection)}` : "Export to S3"],
    ["Scan read rate", achievedRcu(collection) === null ? "—" : `${fmtRate(achievedRcu(collection))} RCU/s`],
    ["Throttled requests", fmtInt(scan.scan_throttled_requests ?? 0)],
    ["Load finished", scan.scan_end_time ? `${fmtTime(scan.scan_end_time)}${loadTook ? ` (took ${loadTook})` : ""}` : "—"],
    ["Source state", STATE_NAMES[source.state] ? `${STATE_NAMES[source.state]} (${source.state})` : source.state || "—"],
    ["Stream last read", scan.stream_last_processed_at ? fmtTime(scan.stream_last_processed_at) : "—"],
    ["Stream shards", Array.isArray(scan.stream_shards) && scan.stream_shards.length
      ? `${scan.stream_shards.length} (${scan.stream_shards.filter((shard) => !shard.done).length} open)` : "—"],
    ["Created", fmtTime(collection.created_at)],
  ];
  return h("section", { class: "card" }, h("h2", null, "Details"),
    h("dl", { class: "details" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)])));
}

export function collectionView(main, workspace, name) {
  const key = `${workspace}.${name}`;
  const badgeSlot = h("span");
  const alerts = h("div");
  const progressSlot = h("div");
  const stats = h("div", { class: "stats" });
  const rateCanvas = h("canvas", { class: "chart", "aria-label": "Ingest rate over the last 5 minutes" });
  const lagCanvas = h("canvas", { class: "chart", "aria-label": "Sync lag over the last 5 minutes" });
  const rateNow = h("span", { class: "chart-now" });
  const lagNow = h("span", { class: "chart-now" });
  const detailsSlot = h("div");
  const rateChart = new TimeChart(rateCanvas, { color: "--chart-rate", format: fmtRate, windowMs: WINDOW_MS, minTop: 4 });
  const lagChart = new TimeChart(lagCanvas, { color: "--chart-lag", format: fmtMs, windowMs: WINDOW_MS, minTop: 100 });
  const rateLabel = h("h3", null, "Ingest rate");

  const remove = async () => {
    if (!(await confirmDialog(`Delete ${key}?`,
      "Its documents and index are removed from this server. The DynamoDB table is not touched.", "Delete collection"))) return;
    try {
      await api.deleteCollection(workspace, name);
      samplesByCollection.delete(key);
      toast(`Deleted ${key}`);
      location.hash = "#/collections";
    } catch (error) {
      mount(alerts, errorAlert(error, "The collection was not deleted"));
    }
  };

  mount(main,
    h("div", { class: "breadcrumbs" }, h("a", { href: "#/collections" }, "Collections"), h("span", null, "/"), h("span", null, key)),
    pageHeader(h("span", { class: "title-with-badge" }, key, badgeSlot), null,
      button("Query", { onclick: () => openInEditor(`SELECT *\nFROM ${key}\nLIMIT 100`) }, "query"),
      button("Delete", { variant: "danger-ghost", onclick: remove }, "trash")),
    alerts, progressSlot, stats,
    h("section", { class: "card charts" },
      h("div", { class: "chart-box" }, h("div", { class: "chart-head" }, rateLabel, rateNow), rateCanvas),
      h("div", { class: "chart-box" }, h("div", { class: "chart-head" }, h("h3", null, "Sync lag"), lagNow), lagCanvas)),
    detailsSlot);

  const stop = poll(async (signal) => {
    let collection;
    try {
      collection = await api.collection(workspace, name, { signal });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      mount(alerts, errorAlert(error, error.status === 404 ? "This collection does not exist" : "Could not read the status"));
      return;
    }
    const samples = record(key, collection);
    const [label, tone] = badgeOf(collection);
    mount(badgeSlot, badge(label, tone));
    const problem = problemOf(collection);
    const throttled = recentThrottling(samples);
    mount(alerts,
      problem ? alertBox(problem.kind === "rebuilding" || problem.kind === "throttled" ? "warn" : "error",
        problem.title, problem.message, problem.detail.join(" · ")) : null,
      throttled > 0 ? alertBox("warn", "DynamoDB is throttling the scan",
        `${fmtInt(throttled)} throttled ${throttled === 1 ? "request" : "requests"} in the last ${THROTTLE_WINDOW_MS / 1000} s; the scan slows down and retries them.`) : null);
    // A load that failed before reading anything has no progress to show; the alert says why.
    const started = sourceOf(collection).scan.scan_records_processed > 0;
    mount(progressSlot, isLoading(collection) && (started || !problem) ? progressCard(collection, samples) : null);
    const last = samples[samples.length - 1];
    mount(stats,
      stat("Documents", fmtInt(collection.stats?.doc_count)),
      stat("Size", fmtBytes(collection.stats?.total_size)),
      stat("Sync lag", fmtMs(collection.stats?.sync_lag_ms), collection.status === "READY" ? "behind the table" : "known once loaded"),
      stat("Ingest rate", last.rate === null ? "—" : `${fmtRate(last.rate)}/s`,
        countsStreamRecords(collection) || isLoading(collection) ? "items per second" : "new documents per second"));
    rateLabel.textContent = isLoading(collection) || countsStreamRecords(collection) ? "Ingest rate (items/s)" : "Ingest rate (new docs/s)";
    rateNow.textContent = last.rate === null ? "" : `${fmtRate(last.rate)}/s`;
    lagNow.textContent = fmtMs(last.lag);
    rateChart.update(samples.map((s) => ({ t: s.t, v: s.rate })));
    lagChart.update(samples.map((s) => ({ t: s.t, v: s.lag })));
    mount(detailsSlot, detailsCard(collection));
  }, POLL_MS);

  return () => {
    stop();
    rateChart.dispose();
    lagChart.dispose();
  };
}
