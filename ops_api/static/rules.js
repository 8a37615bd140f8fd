// The alert-rules editor (docs/rules.md): the city's rules as JSON with their version, a backtest of
// one rule over the stored data, saving as a new version with a comment, and the history with
// rollback. Its own module beside app.js: it reads the token and city app.js keeps, and loads only
// while its panel is open.
const $ = (id) => document.getElementById(id);
const TEXT = {
  id: { by: "oleh", saved: "Tersimpan sebagai versi", rolled: "Dikembalikan sebagai versi", alerts: "peringatan",
        on: "pada", devices: "perangkat", open: "masih terbuka", rollback: "Kembalikan", none: "Tidak ada peringatan" },
  en: { by: "by", saved: "Saved as version", rolled: "Rolled back as version", alerts: "alerts",
        on: "on", devices: "devices", open: "still open", rollback: "Roll back", none: "No alerts" },
};
const say = (key) => (TEXT[localStorage.getItem("kota.lang") === "en" ? "en" : "id"] || TEXT.id)[key];
const current = { city: null, version: null };

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { Authorization: `Bearer ${localStorage.getItem("kota.token")}`,
    "Content-Type": "application/json" } });
  const body = await response.json();
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail
      : (body.detail || []).map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    throw new Error(`${response.status} ${detail}`);
  }
  return body;
}

function show(message, bad = false) {
  $("rules-message").textContent = message;
  $("rules-message").className = bad ? "bad" : "ok";
}

const base = () => `/api/v1/cities/${encodeURIComponent(current.city)}/rules`;

async function load() {
  current.city = $("city").value;
  if (!current.city || !$("rules-panel").open) return;
  const rules = await call(base());
  current.version = rules.version;
  $("rules-version").textContent = `v${rules.version} · ${say("by")} ${rules.author} · ${rules.comment}`;
  $("rules-json").value = JSON.stringify(rules.rules, null, 2);
  if (!$("rules-preview-rule").value && rules.rules.rules.length) {
    $("rules-preview-rule").value = JSON.stringify(rules.rules.rules[0]);
  }
  const history = await call(`${base()}/versions`);
  $("rules-history").replaceChildren(...history.map((v) => {
    const item = document.createElement("li");
    item.textContent = `v${v.version} ${v.created_at ? new Date(v.created_at).toLocaleString() : ""} ${v.author}: ${v.comment} `;
    if (v.version !== current.version) {
      const button = document.createElement("button");
      button.textContent = say("rollback");
      button.dataset.version = v.version;
      button.onclick = () => rollback(v.version);
      item.append(button);
    }
    return item;
  }));
}

async function save() {
  try {
    const saved = await call(base(), { method: "PUT", body: JSON.stringify({
      rules: JSON.parse($("rules-json").value), comment: $("rules-comment").value, expected_version: current.version }) });
    show(`${say("saved")} ${saved.version}`);
    await load();
  } catch (error) { show(error.message, true); }
}

async function rollback(version) {
  try {
    const saved = await call(`${base()}/rollback`, { method: "POST", body: JSON.stringify({ version, comment: $("rules-comment").value }) });
    show(`${say("rolled")} ${saved.version}`);
    await load();
  } catch (error) { show(error.message, true); }
}

async function preview() {
  try {
    const result = await call(`${base()}/preview`, { method: "POST", body: JSON.stringify({
      rule: JSON.parse($("rules-preview-rule").value), days: Number($("rules-preview-days").value) }) });
    $("rules-preview-summary").textContent = result.alerts
      ? `${result.alerts} ${say("alerts")} ${say("on")} ${result.devices_alerted.length} / ${result.devices_judged} ${say("devices")}`
      : say("none");
    $("rules-preview-result").replaceChildren(...result.episodes.map((e) => {
      const item = document.createElement("li");
      const cleared = e.cleared_at ? new Date(e.cleared_at).toLocaleString() : say("open");
      item.textContent = `${e.device_id}: ${new Date(e.raised_at).toLocaleString()} → ${cleared} (${e.minutes} min, ${e.worst})`;
      return item;
    }));
    show("");
  } catch (error) { show(error.message, true); }
}

window.addEventListener("DOMContentLoaded", () => {
  $("rules-panel").addEventListener("toggle", () => load().catch((error) => show(error.message, true)));
  $("city").addEventListener("change", () => load().catch((error) => show(error.message, true)));
  $("rules-save").onclick = save;
  $("rules-preview").onclick = preview;
});
