// Integrations: how Shoal reaches an AWS account. Secrets go in through the form and never
// come back: the list shows only which kind of credentials an integration holds.

import { api } from "../api.js";
import { fmtAgo, h, mount } from "../dom.js";
import { button, confirmDialog, emptyState, errorAlert, field, linkButton, pageHeader, toast } from "../ui.js";

function credentialsLabel(dynamodb) {
  if (dynamodb.aws_role) return ["IAM role", dynamodb.aws_role.aws_role_arn];
  if (dynamodb.aws_access_key) return ["Access key", "secret stored, never shown"];
  return ["Default chain", "environment, profile or instance role"];
}

function integrationRow(integration, reload, alerts) {
  const [kind, note] = credentialsLabel(integration.dynamodb || {});
  const remove = async () => {
    if (!(await confirmDialog(`Delete integration ${integration.name}?`,
      "Its stored credentials are erased from this server.", "Delete integration"))) return;
    try {
      await api.deleteIntegration(integration.name);
      toast(`Deleted ${integration.name}`);
      reload();
    } catch (error) {
      mount(alerts, errorAlert(error, `${integration.name} was not deleted`));
    }
  };
  const used = integration.collections || [];
  return h("tr", { "data-integration": integration.name },
    h("td", null, h("strong", null, integration.name),
      integration.description ? h("div", { class: "cell-note" }, integration.description) : null),
    h("td", null, h("div", null, kind), h("div", { class: "cell-note" }, note)),
    h("td", null, integration.dynamodb?.endpoint_url || h("span", { class: "muted" }, "AWS")),
    h("td", null, integration.dynamodb?.s3_export_bucket_name || h("span", { class: "muted" }, "—")),
    h("td", null, used.length ? used.join(", ") : h("span", { class: "muted" }, "none")),
    h("td", { class: "muted nowrap" }, fmtAgo(integration.created_at)),
    h("td", { class: "actions" },
      button("Delete", { variant: "danger-ghost", onclick: remove, disabled: used.length > 0,
        title: used.length ? "Delete the collections that use it first" : null }, "trash")));
}

export function integrationsView(main) {
  const alerts = h("div");
  const body = h("div", { class: "card" }, h("div", { class: "loading" }, "Loading integrations…"));
  mount(main,
    pageHeader("Integrations", "Credentials for reading DynamoDB tables. Secrets are write-only.",
      linkButton("New integration", "#/integrations/new", "primary", "plus")),
    alerts, body);

  const load = async () => {
    try {
      const integrations = await api.integrations();
      if (!integrations.length) {
        mount(body, emptyState("No integrations yet",
          "An integration holds an access key, a role to assume, or uses the server's default AWS credentials.",
          linkButton("New integration", "#/integrations/new", "primary", "plus")));
        return;
      }
      mount(body, h("div", { class: "table-scroll" }, h("table", { class: "table" },
        h("thead", null, h("tr", null, h("th", null, "Name"), h("th", null, "Credentials"), h("th", null, "Endpoint"),
          h("th", null, "S3 export bucket"), h("th", null, "Used by"), h("th", null, "Created"), h("th", null, ""))),
        h("tbody", null, integrations.map((i) => integrationRow(i, load, alerts))))));
    } catch (error) {
      mount(body, errorAlert(error, "Could not list integrations"));
    }
  };
  load();
}

export function newIntegrationView(main) {
  const input = (attrs) => h("input", { type: "text", autocomplete: "off", spellcheck: "false", ...attrs });
  const name = input({ name: "name", placeholder: "prod", required: true });
  const description = input({ name: "description", placeholder: "Optional" });
  const kinds = ["access_key", "role", "default"];
  const kind = Object.fromEntries(kinds.map((k) => [k, h("input", { type: "radio", name: "credentials", value: k, checked: k === "access_key" })]));
  const keyId = input({ name: "aws_access_key_id", placeholder: "AKIA…" });
  // Write-only: a password field, never filled back from the server.
  const secret = h("input", { type: "password", name: "aws_secret_access_key", autocomplete: "new-password" });
  const roleArn = input({ name: "aws_role_arn", placeholder: "arn:aws:iam::123456789012:role/shoal" });
  const externalId = input({ name: "aws_external_id", placeholder: "Optional" });
  const bucket = input({ name: "s3_export_bucket_name", placeholder: "Optional: needed for S3 export loads" });
  const endpoint = input({ name: "endpoint_url", placeholder: "Optional: e.g. http://localhost:8000 for DynamoDB Local" });
  const keyFields = h("div", { class: "indent row" }, field("Access key ID", keyId), field("Secret access key", secret, "Stored on the server; never shown again."));
  const roleFields = h("div", { class: "indent row" }, field("Role ARN", roleArn), field("External ID", externalId));
  const message = h("div");
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Create integration");

  const body = () => {
    const dynamodb = {};
    if (kind.access_key.checked) {
      dynamodb.aws_access_key = { aws_access_key_id: keyId.value.trim(), aws_secret_access_key: secret.value };
    } else if (kind.role.checked) {
      dynamodb.aws_role = { aws_role_arn: roleArn.value.trim() };
      if (externalId.value.trim()) dynamodb.aws_role.aws_external_id = externalId.value.trim();
    }
    if (bucket.value.trim()) dynamodb.s3_export_bucket_name = bucket.value.trim();
    if (endpoint.value.trim()) dynamodb.endpoint_url = endpoint.value.trim();
    const request = { name: name.value.trim(), dynamodb };
    if (description.value.trim()) request.description = description.value.trim();
    return request;
  };
  const refresh = () => {
    keyFields.hidden = !kind.access_key.checked;
    roleFields.hidden = !kind.role.checked;
    keyId.required = secret.required = kind.access_key.checked;
    roleArn.required = kind.role.checked;
  };

  const choice = (k, title, hint) => h("label", { class: "choice" }, kind[k],
    h("span", null, h("strong", null, title), h("span", { class: "hint" }, hint)));
  const form = h("form", { class: "card form", onchange: refresh, onsubmit: async (event) => {
    event.preventDefault();
    submit.disabled = true;
    mount(message);
    try {
      const created = await api.createIntegration(body());
      secret.value = "";
      toast(`Created integration ${created.name}`);
      location.hash = "#/integrations";
    } catch (error) {
      mount(message, errorAlert(error, "The integration was not created"));
      submit.disabled = false;
    }
  } },
    message,
    h("fieldset", null, h("legend", null, "Integration"),
      h("div", { class: "row" }, field("Name", name), field("Description", description))),
    h("fieldset", null, h("legend", null, "AWS credentials"),
      choice("access_key", "Access key", "An IAM user's key pair."), keyFields,
      choice("role", "Assume a role", "Shoal calls STS AssumeRole with the server's own credentials."), roleFields,
      choice("default", "Server's default credentials", "Environment variables, profile or instance role of the Shoal host.")),
    h("fieldset", null, h("legend", null, "Options"),
      field("S3 export bucket", bucket), field("DynamoDB endpoint URL", endpoint)),
    h("div", { class: "form-actions" }, linkButton("Cancel", "#/integrations"), submit));

  mount(main,
    pageHeader("New integration", "Tell Shoal how to reach your AWS account.",
      linkButton("Back", "#/integrations", "ghost", "back")),
    h("div", { class: "form-layout form-layout-narrow" }, form));
  refresh();
}
