// The console's shell: sign-in, the sidebar, and the hash router that shows one view at a time.

import { ApiError, api, forgetKey, setUnauthorizedHandler, storeKey, storedKey } from "./api.js";
import { h, icon, mount } from "./dom.js";
import { alertBox } from "./ui.js";
import { collectionsView, newCollectionView } from "./views/collections.js";
import { collectionView } from "./views/collection.js";
import { integrationsView, newIntegrationView } from "./views/integrations.js";
import { queryView } from "./views/query.js";

const root = document.getElementById("app");

// [pattern, view, nav section]; a view is (container, ...params) => optional dispose function.
const ROUTES = [
  [/^#\/collections\/new$/, newCollectionView, "collections"],
  [/^#\/collections\/([^/]+)\/([^/]+)$/, collectionView, "collections"],
  [/^#\/collections$/, collectionsView, "collections"],
  [/^#\/integrations\/new$/, newIntegrationView, "integrations"],
  [/^#\/integrations$/, integrationsView, "integrations"],
  [/^#\/query$/, queryView, "query"],
];

let disposeView = null;
let signInNotice = null;

function navLink(section, label, iconName, active) {
  return h("a", { class: `nav-link${active ? " active" : ""}`, href: `#/${section}`, "data-nav": section },
    icon(iconName), h("span", null, label));
}

function shell(section) {
  const main = h("main", { class: "main", id: "main" });
  const sidebar = h("aside", { class: "sidebar" },
    h("a", { class: "brand", href: "#/collections" },
      h("img", { class: "brand-mark", src: "/static/favicon.svg", alt: "" }),
      h("span", null, "Shoal")),
    h("nav", { class: "nav" },
      navLink("collections", "Collections", "collections", section === "collections"),
      navLink("query", "SQL editor", "query", section === "query"),
      navLink("integrations", "Integrations", "integrations", section === "integrations")),
    h("div", { class: "sidebar-foot" },
      h("div", { class: "server" }, h("span", { class: "server-dot" }), location.host),
      h("button", { type: "button", class: "nav-link signout", onclick: signOut }, icon("logout"), h("span", null, "Sign out"))));
  mount(root, h("div", { class: "layout" }, sidebar, main));
  return main;
}

function route() {
  if (disposeView) disposeView();
  disposeView = null;
  if (!storedKey()) return showSignIn();
  const hash = location.hash || "#/collections";
  for (const [pattern, view, section] of ROUTES) {
    const match = hash.match(pattern);
    const parts = match && decodedParts(match.slice(1));
    if (parts) {
      const main = shell(section);
      disposeView = view(main, ...parts) || null;
      return;
    }
  }
  location.replace("#/collections");
}

// The hash's parts decoded, or null when one is no valid escape (such as "%E0"): a link
// typed or cut wrongly goes back to the collections rather than leave a blank page.
function decodedParts(parts) {
  try {
    return parts.map(decodeURIComponent);
  } catch {
    return null;
  }
}

function signOut() {
  forgetKey();
  signInNotice = null;
  route();
}

function showSignIn() {
  const keyInput = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "current-password",
    placeholder: "Paste your API key", required: true, autofocus: true });
  const remember = h("input", { type: "checkbox", id: "remember" });
  const message = h("div", { class: "signin-message" }, signInNotice ? alertBox("warn", null, signInNotice) : null);
  const submit = h("button", { type: "submit", class: "btn btn-primary btn-block" }, "Sign in");
  const form = h("form", { class: "signin-card", onsubmit: async (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    submit.disabled = true;
    mount(message);
    try {
      await api.checkKey(key);
      storeKey(key, remember.checked);
      signInNotice = null;
      route();
    } catch (error) {
      const text = error instanceof ApiError && error.status === 401
        ? "That key was not accepted. Use the key printed when the server first started, or the one given with --api-key."
        : error.message;
      mount(message, alertBox("error", "Could not sign in", text));
      submit.disabled = false;
      keyInput.select();
    }
  } },
    h("div", { class: "brand brand-large" }, h("img", { class: "brand-mark", src: "/static/favicon.svg", alt: "" }), h("span", null, "Shoal")),
    h("h1", null, "Sign in to the console"),
    h("p", { class: "subtitle" }, "Real-time SQL over your DynamoDB tables. The key stays in this browser."),
    message,
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), keyInput),
    h("label", { class: "check" }, remember, h("span", null, "Keep me signed in on this device")),
    submit);
  mount(root, h("div", { class: "signin" }, form));
  keyInput.focus();
}

setUnauthorizedHandler(() => {
  if (!storedKey()) return;
  forgetKey();
  signInNotice = "The server no longer accepts your API key; sign in again.";
  route();
});

window.addEventListener("hashchange", route);
route();
