// The device commands panel: pick a device, send it a command of its catalogue, follow its
// commands (status, who asked and approved), approve a critical one. Everything goes through
// /api/v1/devices/{id}/commands with the operator's token; the API checks role and city.
import { language } from "./i18n.js";

const WORDS = {
  id: { device: "Perangkat", send: "Kirim", approve: "Setujui", none: "belum ada perintah", critical: "kritis",
        by: "oleh", approved_by: "disetujui", refused: "ditolak" },
  en: { device: "Device", send: "Send", approve: "Approve", none: "no commands yet", critical: "critical",
        by: "by", approved_by: "approved by", refused: "refused" },
};
const w = (key) => WORDS[language()]?.[key] ?? WORDS.en[key];

export class CommandsPanel {
  // api(path, options) answers JSON or throws Error("STATUS detail"); el(tag, attrs, ...children) makes a node.
  constructor(root, api, el) {
    this.root = root; this.api = api; this.el = el; this.deviceId = null;
    // What each part last showed: a part is drawn again only when that changes, so the refresh
    // every few seconds neither wipes a value being typed nor swallows a click on Approve.
    this.shown = { controls: null };
    this.select = root.querySelector("#command-device");
    this.controls = root.querySelector("#command-controls");
    this.history = root.querySelector("#command-history");
    this.message = root.querySelector("#command-message");
    this.select.onchange = () => { this.deviceId = this.select.value; this.refresh(); };
    setInterval(() => this.refresh().catch(() => {}), 3000);  // devices answer on their own time
  }

  setDevices(features) {
    const ids = features.map((f) => f.id).sort();
    this.select.replaceChildren(...ids.map((id) => this.el("option", { value: id }, id)));
    this.deviceId = ids.includes(this.deviceId) ? this.deviceId : ids[0] ?? null;
    this.select.value = this.deviceId ?? "";
    this.refresh();
  }

  async refresh() {
    if (!this.deviceId) {
      this.controls.replaceChildren(); this.history.replaceChildren();
      this.shown = { controls: null };
      return;
    }
    const listing = await this.api(`/api/v1/devices/${encodeURIComponent(this.deviceId)}/commands?limit=10`);
    if (listing.device_id !== this.deviceId) return;  // another device was picked meanwhile
    const controls = JSON.stringify([listing.device_id, language(), listing.catalogue]);
    if (controls !== this.shown.controls) {
      this.controls.replaceChildren(...listing.catalogue.map((spec) => this.control(spec)));
      this.shown.controls = controls;
    }
    this.drawHistory(listing.commands);
  }

  // Row by row: a row that says the same keeps its node, so a click on one command's Approve is
  // not lost when another command's status changes meanwhile; nothing changed, nothing is touched.
  drawHistory(commands) {
    const kept = new Map([...this.history.children].map((li) => [li.dataset.shown, li]));
    const rows = (commands.length ? commands : [null]).map((c) => {
      const shown = JSON.stringify([language(), c]);
      const row = kept.get(shown) ?? (c ? this.row(c) : this.el("li", { class: "muted" }, w("none")));
      row.dataset.shown = shown;
      return row;
    });
    const wanted = new Set(rows);
    for (const li of [...this.history.children]) if (!wanted.has(li)) li.remove();
    rows.forEach((row, i) => {  // insert what is new; rows kept stay where they are
      if (this.history.children[i] !== row) this.history.insertBefore(row, this.history.children[i] ?? null);
    });
  }

  control(spec) {
    const inputs = Object.entries(spec.params).map(([name, p]) => this.el("input", {
      type: "number", min: p.low, max: p.high, step: p.integer ? 1 : "any", placeholder: name,
      "data-param": name, class: "command-param" }));
    const button = this.el("button", { class: `command-send${spec.critical ? " critical" : ""}`,
      "data-command": spec.command, title: spec.description,
      onclick: () => this.send(spec.command, inputs) }, spec.command + (spec.critical ? ` (${w("critical")})` : ""));
    return this.el("span", { class: "command-control" }, ...inputs, button);
  }

  row(c) {
    const params = Object.keys(c.params).length ? ` ${JSON.stringify(c.params)}` : "";
    const who = `${w("by")} ${c.requested_by}${c.approved_by ? `, ${w("approved_by")} ${c.approved_by}` : ""}`;
    const approve = c.status === "awaiting_approval"
      ? this.el("button", { class: "command-approve", onclick: () => this.approve(c.command_id) }, w("approve")) : "";
    return this.el("li", { "data-command-id": c.command_id, "data-status": c.status },
      this.el("b", {}, c.command + params), " · ", this.el("span", { class: `command-status ${c.status}` }, c.status),
      this.el("div", { class: "muted" }, `${new Date(c.created_at).toLocaleTimeString()} ${who}`
        + (c.error ? ` · ${c.error}` : "")), approve);
  }

  async send(command, inputs) {
    const params = Object.fromEntries(inputs.filter((i) => i.value !== "").map((i) => [i.dataset.param, Number(i.value)]));
    await this.act(`/api/v1/devices/${encodeURIComponent(this.deviceId)}/commands`, { command, params });
  }

  async approve(commandId) {
    await this.act(`/api/v1/devices/${encodeURIComponent(this.deviceId)}/commands/${commandId}/approve`, null);
  }

  async act(path, body) {
    this.message.textContent = "";
    try {
      await this.api(path, { method: "POST", body: body === null ? undefined : JSON.stringify(body) });
    } catch (error) {
      this.message.textContent = `${w("refused")}: ${error.message}`;
    }
    await this.refresh();
  }
}
