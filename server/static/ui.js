// Pieces every view uses: page header, badges, alerts, form fields, confirmation, toasts.

import { h, icon } from "./dom.js";

export function pageHeader(title, subtitle, ...actions) {
  return h("header", { class: "page-header" },
    h("div", { class: "page-title" }, h("h1", null, title), subtitle ? h("p", { class: "subtitle" }, subtitle) : null),
    h("div", { class: "page-actions" }, actions));
}

export function badge(label, tone) {
  return h("span", { class: `badge badge-${tone}` }, h("span", { class: "dot" }), label);
}

/** tone: error | warn | info */
export function alertBox(tone, title, message, detail) {
  return h("div", { class: `alert alert-${tone}`, role: tone === "error" ? "alert" : "status" },
    icon("alert", "icon alert-icon"),
    h("div", { class: "alert-body" },
      title ? h("strong", null, title) : null,
      message ? h("p", { class: "alert-message" }, message) : null,
      detail ? h("p", { class: "alert-detail" }, detail) : null));
}

export function errorAlert(error, title = "Request failed") {
  return alertBox("error", title, error.message, error.type && error.status ? `${error.status} ${error.type}` : null);
}

export function button(label, attrs = {}, iconName = null) {
  const { variant = "secondary", ...rest } = attrs;
  return h("button", { type: "button", class: `btn btn-${variant}`, ...rest }, iconName ? icon(iconName) : null, label);
}

export function linkButton(label, href, variant = "secondary", iconName = null) {
  return h("a", { class: `btn btn-${variant}`, href }, iconName ? icon(iconName) : null, label);
}

/** A labelled form field: field("Name", input, "hint"). */
export function field(label, control, hint) {
  const id = control.id || (control.id = `f-${Math.random().toString(36).slice(2, 9)}`);
  return h("div", { class: "field" },
    h("label", { for: id }, label),
    control,
    hint ? h("p", { class: "hint" }, hint) : null);
}

export function emptyState(title, text, action) {
  return h("div", { class: "empty" }, h("h3", null, title), h("p", null, text), action || null);
}

/** A modal yes/no question; resolves to true when confirmed. */
export function confirmDialog(title, text, confirmLabel) {
  return new Promise((resolve) => {
    const dialog = h("dialog", { class: "dialog" },
      h("form", { method: "dialog" },
        h("h2", null, title),
        h("p", null, text),
        h("div", { class: "dialog-actions" },
          h("button", { class: "btn btn-secondary", value: "cancel" }, "Cancel"),
          h("button", { class: "btn btn-danger", value: "confirm" }, confirmLabel))));
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "confirm");
      dialog.remove();
    });
    document.body.appendChild(dialog);
    dialog.showModal();
  });
}

export function toast(message, tone = "ok") {
  let tray = document.querySelector(".toasts");
  if (!tray) document.body.appendChild((tray = h("div", { class: "toasts", "aria-live": "polite" })));
  const note = h("div", { class: `toast toast-${tone}` }, message);
  tray.appendChild(note);
  setTimeout(() => note.remove(), 4000);
}

/**
 * Call `tick` now and then every `intervalMs` until the returned stop() is called; a tick
 * that is still running delays the next one, so slow servers are not piled up on.
 */
export function poll(tick, intervalMs) {
  let stopped = false;
  let timer = null;
  const controller = new AbortController();
  const run = async () => {
    if (stopped) return;
    try {
      await tick(controller.signal);
    } catch (error) {
      if (error.name !== "AbortError") console.warn("poll failed", error);
    }
    if (!stopped) timer = setTimeout(run, intervalMs);
  };
  run();
  return () => {
    stopped = true;
    clearTimeout(timer);
    controller.abort();
  };
}
