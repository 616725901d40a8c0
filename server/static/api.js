// The REST API, as the console uses it. The API key lives only in this browser:
// localStorage when "keep me signed in" was ticked, sessionStorage otherwise.

const KEY_NAME = "shoal.apiKey";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME);
}

export function storeKey(key, remember) {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
}

/** Called when the server rejects the key (set by the app: back to sign-in). */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

/** One call; resolves to the parsed JSON body, rejects with ApiError (status 0: unreachable). */
export async function call(method, path, body, { key = storedKey(), signal } = {}) {
  const init = { method, headers: { Authorization: `ApiKey ${key}` }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "UNREACHABLE", "cannot reach the Shoal server; is it running?");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, payload?.type || "HTTP_ERROR",
      payload?.message || `HTTP ${response.status}`);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return payload;
}

const ORG = "/v1/orgs/self";
const part = encodeURIComponent;

export const api = {
  checkKey: (key) => call("GET", `${ORG}/integrations`, undefined, { key }),
  integrations: () => call("GET", `${ORG}/integrations`).then((r) => r.data),
  createIntegration: (body) => call("POST", `${ORG}/integrations`, body).then((r) => r.data),
  deleteIntegration: (name) => call("DELETE", `${ORG}/integrations/${part(name)}`).then((r) => r.data),
  collections: (opts) => call("GET", `${ORG}/collections`, undefined, opts).then((r) => r.data),
  collection: (ws, name, opts) =>
    call("GET", `${ORG}/ws/${part(ws)}/collections/${part(name)}`, undefined, opts).then((r) => r.data),
  createCollection: (ws, body) => call("POST", `${ORG}/ws/${part(ws)}/collections`, body).then((r) => r.data),
  deleteCollection: (ws, name) =>
    call("DELETE", `${ORG}/ws/${part(ws)}/collections/${part(name)}`).then((r) => r.data),
  query: (body) => call("POST", `${ORG}/queries`, body),
  queryPage: (queryId, cursor, docs) =>
    call("GET", `${ORG}/queries/${part(queryId)}/pages/${part(cursor)}?docs=${docs}`),
};
