// What a collection's status JSON means for the person looking at it: one place that reads
// the API's fields, so the list and the detail view tell the same story.

const LOADING_STATES = new Set(["INITIALIZING", "SCANNING", "EXPORTING_TO_S3", "DOWNLOADING_FROM_S3"]);

export function sourceOf(collection) {
  const source = collection.sources?.[0] || {};
  const dynamodb = source.dynamodb || {};
  return {
    integration: source.integration_name,
    table: dynamodb.table_name,
    region: dynamodb.aws_region,
    rcu: dynamodb.rcu,
    useScan: dynamodb.use_scan_api !== false,
    state: dynamodb.current_status?.state || dynamodb.status?.state,
    percent: dynamodb.current_status?.initial_dump_completion_percentage,
    scan: dynamodb.status || {},
    health: source.status || {},
  };
}

/** True while the initial bulk load (scan or S3 export) runs. */
export function isLoading(collection) {
  return collection.status !== "READY" && LOADING_STATES.has(sourceOf(collection).state);
}

/** Whether the status counts stream records applied (`stream_records_processed`); without it the
 * ingest rate after the load can only be the net change in document count. */
export function countsStreamRecords(collection) {
  return typeof sourceOf(collection).scan.stream_records_processed === "number";
}

/** Read capacity per second the scan achieved (recent while scanning, its average after), or null. */
export function achievedRcu(collection) {
  const rate = sourceOf(collection).scan.scan_rcu_per_second;
  return typeof rate === "number" ? rate : null;
}

/** The scan's read budget: the one asked for, else the one the server chose from the table. */
export function rcuBudget(collection) {
  const source = sourceOf(collection);
  return source.rcu ?? source.scan.scan_rcu_budget ?? null;
}

/**
 * The problem to show, or null: {kind, title, message, detail}.
 * kind: "rebuilding" (the server reloads the table, e.g. after the stream was trimmed),
 * "trimmed" (stream data lost, no rebuild under way), "throttled" (a failure DynamoDB's
 * throttling caused), "error" (ingest failing, being retried). Throttling the scan absorbs
 * by slowing down is no failure: the detail view shows it from `scan_throttled_requests`.
 */
export function problemOf(collection) {
  const { health } = sourceOf(collection);
  const message = health.message || "";
  const detail = [];
  if (health.last_error_at) detail.push(`last failure ${new Date(health.last_error_at).toLocaleTimeString()}`);
  if (health.retries) detail.push(`${health.retries} ${health.retries === 1 ? "retry" : "retries"} so far`);
  if (health.state === "REBUILDING") {
    return { kind: "rebuilding",
      title: /trimmed/i.test(message) ? "The stream was trimmed: rebuilding from a new bulk load" : "Rebuilding from a new bulk load",
      message: message || "Query results may be stale until the collection has caught up.", detail };
  }
  if (/TrimmedDataAccess|trimmed/i.test(message)) {
    return { kind: "trimmed", title: "The stream was trimmed past Shoal's position",
      message: `${message} Changes were lost; the collection needs a new bulk load.`, detail };
  }
  if (/ProvisionedThroughputExceeded|Throttl/i.test(message)) {
    return { kind: "throttled", title: "DynamoDB is throttling reads", message, detail };
  }
  if (health.state === "ERROR" || message) {
    return { kind: "error", title: "Ingest is failing and being retried", message: message || "unknown error", detail };
  }
  return null;
}

/** The badge for a collection: [label, tone] with tone in ok | busy | warn | bad | muted. */
export function badgeOf(collection) {
  const problem = problemOf(collection);
  if (collection.status === "DELETED") return ["Deleted", "muted"];
  if (problem?.kind === "rebuilding") return ["Rebuilding", "warn"];
  if (problem?.kind === "throttled") return ["Throttled", "warn"];
  if (problem) return ["Error", "bad"];
  if (collection.status === "READY") return ["Ready", "ok"];
  if (collection.status === "PAUSED") return ["Paused", "warn"];
  if (isLoading(collection)) {
    const { state, percent } = sourceOf(collection);
    const verb = state === "INITIALIZING" ? "Starting" : "Loading";
    return [percent ? `${verb} ${Math.floor(percent)}%` : verb, "busy"];
  }
  return ["Catching up", "busy"];
}
