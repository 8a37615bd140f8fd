// The command-centre page: plain ES modules, no build step. Data comes from /api/v1 with the
// operator's token; live values arrive over the WebSocket feed and update the page in place.
import { CityMap, STATUS_COLOURS } from "./map.js";
import { CommandsPanel } from "./commands.js";
import { language, setLanguage, t } from "./i18n.js";
import { renderNotifications, showLinkedAlert } from "./notifications.js";

const $ = (id) => document.getElementById(id);
const state = { token: null, city: null, cities: [], latest: new Map(), liveCount: 0, socket: null };
let map;
let commandsPanel;

// -- small helpers -----------------------------------------------------------------------------
const fmt = (v, digits = 1) => (v === null || v === undefined ? "—" : Number(v).toFixed(digits));
const time = (ts) => (ts ? new Date(ts).toLocaleTimeString(language() === "id" ? "id-ID" : "en-GB") : "—");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

// A value cell the live feed keeps current: data-device + data-metric name it.
function liveCell(deviceId, metric, value, digits = 1, unit = "") {
  return el("td", { class: "num", "data-device": deviceId, "data-metric": metric, "data-digits": digits,
                    "data-unit": unit }, value === null || value === undefined ? "—" : `${fmt(value, digits)}${unit}`);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { Authorization: `Bearer ${state.token}`,
    "Content-Type": "application/json", ...(options.headers || {}) } });
  if (response.status === 401) { logout(t("bad_token")); throw new Error("401"); }
  if (!response.ok) {
    const detail = (await response.json()).detail;  // a string, or {code, message} (commands)
    throw new Error(`${response.status} ${detail?.code ? `${detail.code}: ${detail.message}` : detail}`);
  }
  return response.json();
}

// -- sign-in -----------------------------------------------------------------------------------
function tokenFromUrl() {
  const match = location.hash.match(/token=([^&]+)/);
  if (!match) return null;
  history.replaceState(null, "", location.pathname);  // do not leave the token in the address bar
  return decodeURIComponent(match[1]);
}

function logout(message = "") {
  localStorage.removeItem("kota.token");
  if (state.socket) state.socket.close();
  $("app").hidden = true; $("login").hidden = false; $("login-error").textContent = message;
}

async function start(token) {
  state.token = token;
  try { state.cities = await api("/api/v1/cities"); } catch { return; }
  localStorage.setItem("kota.token", token);
  $("login").hidden = true; $("app").hidden = false;
  const select = $("city");
  select.replaceChildren(...state.cities.map((c) => el("option", { value: c.city }, c.city)));
  state.city = localStorage.getItem("kota.city");
  if (!state.cities.some((c) => c.city === state.city)) state.city = state.cities[0]?.city ?? null;
  select.value = state.city;
  $("province-toggle").hidden = state.cities.length < 2;
  // Opened from a notification's link (#alert=<id>): that alert, in its own city.
  const linked = await showLinkedAlert($("linked-alert"), api, language()).catch(() => null);
  if (linked && state.cities.some((c) => c.city === linked.city)) { state.city = linked.city; select.value = state.city; }
  await loadCity();
  connectLive();
  setInterval(refreshViews, 10_000);
  setInterval(refreshHealth, 10_000);
  refreshHealth();
}

// -- data --------------------------------------------------------------------------------------
async function loadCity() {
  if (!state.city) return;
  localStorage.setItem("kota.city", state.city);
  const devices = await api(`/api/v1/devices?city=${encodeURIComponent(state.city)}`);
  map.setDevices(devices.features);
  commandsPanel.setDevices(devices.features);
  state.latest.clear();
  for (const f of devices.features) state.latest.set(f.id, f.properties.latest);
  $("device-count").replaceChildren(`${devices.features.length} `, el("span", { "data-i18n": "devices" }, t("devices")));
  drawLegend();
  await refreshViews();
  renderNotifications($("notifications-panel"), api, state.city, language()).catch(() => {});
}

async function refreshViews() {
  if (!state.city) return;
  const city = encodeURIComponent(state.city);
  const [env, living, alerts] = await Promise.all([
    api(`/api/v1/cities/${city}/environment`), api(`/api/v1/cities/${city}/living`),
    api(`/api/v1/alerts?city=${city}&state=open&limit=200`)]);
  renderEnvironment(env); renderLiving(living); renderAlerts(alerts.alerts);
  if (!$("province").hidden) renderProvince((await api("/api/v1/province")).cities);
}

async function refreshHealth() {
  // Signed in, /health has each dependency (anyone else gets only ok or degraded); 503 still has a body.
  const health = await (await fetch("/health", { headers: { Authorization: `Bearer ${state.token}` } })).json();
  if (!health.dependencies) return;
  $("health").replaceChildren(...Object.entries(health.dependencies).map(([name, d]) =>
    el("span", { class: d.ok ? "ok" : "bad", style: "margin-right:10px" }, `${name} ${d.ok ? "✓" : "✗"}`)),
    el("span", {}, `lag ${health.processor.consumer_lag ?? "—"}`));
}

// -- panels ------------------------------------------------------------------------------------
function renderEnvironment(env) {
  $("air").replaceChildren(...(env.air_quality.length ? env.air_quality.map((s) => el("tr", {},
    el("td", {}, s.device_id, el("div", { class: "muted" }, s.district ?? "")),
    el("td", {}, s.ispu.category ? el("span", { class: "chip", style: `background:${s.ispu.hex}` },
      `${s.ispu.display} ${ispuCategory(s.ispu)}`) : t("no_data")),
    el("td", { class: "muted" }, s.critical ?? ""),
    liveCell(s.device_id, "pm25", state.latest.get(s.device_id)?.pm25?.value, 1, " µg/m³"))) : [emptyRow()]));
  $("water").replaceChildren(...(env.water_levels.length ? env.water_levels.map((g) => el("tr", {},
    el("td", {}, g.device_id, el("div", { class: "muted" }, g.district ?? "")),
    liveCell(g.device_id, "currentLevel", g.level_cm, 0, " cm"),
    el("td", { class: g.siaga && g.siaga < 4 ? "bad" : "ok" }, g.siaga_label ?? "—"),
    el("td", { class: g.rising_fast ? "bad" : "muted" },
       g.rise_cm_per_h === null ? "" : `${fmt(g.rise_cm_per_h)} cm/h${g.rising_fast ? " · " + t("rising") : ""}`)))
    : [emptyRow()]));
  $("noise").replaceChildren(...(env.noise.length ? env.noise.map((n) => el("tr", {},
    el("td", {}, n.device_id, el("div", { class: "muted" }, n.district ?? "")),
    liveCell(n.device_id, "LAeq", n.laeq, 1, " dB(A)"),
    el("td", { class: n.exceeds_limit ? "bad" : "muted" }, `${t("limit")} ${fmt(n.limit_dba, 0)}`
       + (n.exceeds_limit ? ` (+${fmt(n.excess_db)})` : "")))) : [emptyRow()]));
}

function renderLiving(living) {
  $("traffic").replaceChildren(...(living.traffic.length ? living.traffic.map((c) => el("tr", {},
    el("td", {}, c.device_id, el("div", { class: "muted" }, c.district ?? "")),
    liveCell(c.device_id, "averageVehicleSpeed", c.speed_kmh, 0, " km/h"),
    el("td", { class: c.congested ? "bad" : "ok" }, `${t("congestion")} ${fmt(c.congestion_index, 2)}`),
    el("td", { class: "muted" }, c.usual_speed_kmh === null ? "" :
       `${t("usual")} ${fmt(c.usual_speed_kmh, 0)} km/h (${c.speed_vs_usual_pct > 0 ? "+" : ""}${fmt(c.speed_vs_usual_pct, 0)}%)`)))
    : [emptyRow()]));
  $("utilities").replaceChildren(...(living.utilities.length ? living.utilities.map((m) => el("tr", {},
    el("td", {}, m.device_id, el("div", { class: "muted" }, m.district ?? "")),
    liveCell(m.device_id, m.metric, m.latest, 2, ` ${m.unit ?? ""}`),
    el("td", { class: "muted" }, m.vs_baseline_pct === null ? "" : `${t("vs_baseline")} ${m.vs_baseline_pct > 0 ? "+" : ""}${fmt(m.vs_baseline_pct, 0)}%`),
    el("td", { class: "bad" }, m.suspected_leak ? t("leak") : ""))) : [emptyRow()]));
  $("lighting").replaceChildren(...living.street_lighting.map((d) => el("tr", {},
    el("td", {}, d.district), el("td", { class: "ok" }, `${t("on")} ${d.on}`), el("td", {}, `${t("off")} ${d.off}`),
    el("td", { class: d.fault ? "bad" : "muted" }, `${t("fault")} ${d.fault}`),
    el("td", { class: d.offline ? "warn" : "muted" }, `${t("offline")} ${d.offline}`))));
}

// The open alerts as last drawn: redrawn only when they change, so the refresh every 10 s never
// swallows a click on Acknowledge that lands while the list is being replaced.
let shownAlerts = null;

function renderAlerts(alerts) {
  $("alert-count").textContent = alerts.length;
  const shown = JSON.stringify([language(), alerts]);
  if (shown === shownAlerts) return;
  shownAlerts = null;  // until drawn: a draw that throws is tried again at the next refresh
  $("alerts").replaceChildren(...(alerts.length ? alerts.map((a) => el("li", { class: a.state, "data-alert": a.alert_id },
    el("div", {}, el("span", { class: `chip sev-${a.severity}` }, a.severity), " ", el("b", {}, a.alert_type), " · ",
       a.device_id, el("div", { class: "muted" }, `${a.message} · ×${a.count} · ${time(a.last_ts)} · ${t(a.state)}`)),
    el("div", {}, a.state === "active" ? el("button", { class: "ack", onclick: () => act(a.alert_id, "acknowledge") },
      t("acknowledge")) : "", " ", el("button", { class: "clear", onclick: () => act(a.alert_id, "clear") }, t("clear")))))
    : [el("li", { class: "muted" }, t("no_alerts"))]));
  shownAlerts = shown;
}

function renderProvince(cities) {
  $("province-rows").replaceChildren(...cities.map((c) => el("tr", {},
    el("td", {}, c.city),
    el("td", {}, c.worst_ispu.category ? el("span", { class: "chip", style: `background:${c.worst_ispu.hex}` },
      `${c.worst_ispu.display} ${ispuCategory(c.worst_ispu)}`) : "—"),
    el("td", { class: c.gates_at_siaga ? "bad" : "" }, `${c.gates_at_siaga}${c.worst_siaga && c.worst_siaga < 4 ? ` (Siaga ${c.worst_siaga})` : ""}`),
    el("td", {}, ["critical", "major", "minor", "warning"].filter((s) => c.open_alerts[s]).map((s) => `${s} ${c.open_alerts[s]}`).join(" · ") || "0"),
    el("td", { class: c.devices_offline ? "warn" : "" }, `${c.devices_offline}/${c.devices}`))));
}

const emptyRow = () => el("tr", {}, el("td", { class: "muted" }, t("no_data")));

// ISPU categories (P.14/2020) in the page's language, as the API names them (category, category_en).
const ISPU_CATEGORIES = [
  { category: "Baik", category_en: "Good", hex: "#2e9d48" },
  { category: "Sedang", category_en: "Moderate", hex: "#1f6fd1" },
  { category: "Tidak Sehat", category_en: "Unhealthy", hex: "#f2c200" },
  { category: "Sangat Tidak Sehat", category_en: "Very unhealthy", hex: "#d7263d" },
  { category: "Berbahaya", category_en: "Hazardous", hex: "#111111" },
];
const ispuCategory = (ispu) => (language() === "id" ? ispu.category : ispu.category_en);

function drawLegend() {
  const entries = map.colourBy === "ispu"
    ? ISPU_CATEGORIES.map((c) => [ispuCategory(c), c.hex])
    : Object.entries(STATUS_COLOURS).map(([k, c]) => [t(k), c]);
  $("legend").replaceChildren(...entries.map(([name, c]) => el("span", {}, el("i", { style: `background:${c}` }), name)));
}

async function act(alertId, action) {
  await api(`/api/v1/alerts/${alertId}/${action}`, { method: "POST", body: JSON.stringify({ comment: null }) });
  const alerts = await api(`/api/v1/alerts?city=${encodeURIComponent(state.city)}&state=open&limit=200`);
  renderAlerts(alerts.alerts);
}

// -- live feed ---------------------------------------------------------------------------------
let alertRefresh = null;

function showLive(key, cls) {
  const status = $("live-status");
  status.dataset.i18n = key; status.textContent = t(key); status.className = cls;
}

function connectLive() {
  if (state.socket) state.socket.close();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/api/v1/live?city=${encodeURIComponent(state.city)}&token=${encodeURIComponent(state.token)}`;
  const socket = new WebSocket(url);
  state.socket = socket;
  socket.onopen = () => showLive("connected", "ok");
  socket.onclose = (event) => {
    if (state.socket !== socket) return;  // replaced on purpose (city changed)
    showLive("disconnected", "bad");
    if (event.code === 4401) { logout(t("bad_token")); return; }  // revoked or expired; 4403: scope changed, reconnect
    setTimeout(connectLive, 2000);
  };
  socket.onmessage = (message) => { for (const event of JSON.parse(message.data)) onEvent(event); };
}

function onEvent(event) {
  if (event.type === "readings") {
    state.liveCount += event.readings.length;
    $("live-count").textContent = state.liveCount;
    map.markSeen(event.device_id);
    const latest = state.latest.get(event.device_id) || {};
    for (const r of event.readings) {
      latest[r.metric] = { value: r.value, unit: r.unit, ts: r.ts };
      for (const cell of document.querySelectorAll(`td[data-device="${CSS.escape(event.device_id)}"][data-metric="${CSS.escape(r.metric)}"]`)) {
        cell.textContent = `${fmt(r.value, Number(cell.dataset.digits))}${cell.dataset.unit}`;
      }
    }
    state.latest.set(event.device_id, latest);
    const ticker = $("ticker");
    ticker.prepend(el("li", {}, `${time(event.readings[0].ts)} ${event.device_id} `
      + event.readings.map((r) => `${r.metric}=${fmt(r.value, 2)}`).join(" ")));
    while (ticker.childElementCount > 12) ticker.lastChild.remove();
  } else if (event.type === "alert") {
    clearTimeout(alertRefresh);  // an alarm storm refreshes the list once, not per event
    alertRefresh = setTimeout(async () => {
      const alerts = await api(`/api/v1/alerts?city=${encodeURIComponent(state.city)}&state=open&limit=200`);
      renderAlerts(alerts.alerts);
    }, 300);
  }
}

// -- wiring ------------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", () => {
  map = new CityMap($("map"));
  window.kotaMap = map;  // for the browser test and for curious operators
  commandsPanel = new CommandsPanel($("commands-panel"), api, el);
  setLanguage(language());
  $("lang").textContent = language() === "id" ? "EN" : "ID";
  $("lang").onclick = () => { setLanguage(language() === "id" ? "en" : "id"); $("lang").textContent = language() === "id" ? "EN" : "ID"; drawLegend(); refreshViews();
    if (state.city) renderNotifications($("notifications-panel"), api, state.city, language()).catch(() => {}); };
  $("city").onchange = async (e) => { state.city = e.target.value; await loadCity(); connectLive(); };
  $("colour-by").onchange = (e) => { map.setColourBy(e.target.value); drawLegend(); };
  $("province-toggle").onclick = async () => {
    $("province").hidden = !$("province").hidden;
    if (!$("province").hidden) renderProvince((await api("/api/v1/province")).cities);
  };
  $("logout").onclick = () => logout();
  $("login-form").onsubmit = (e) => { e.preventDefault(); start($("token").value.trim()); };
  const token = tokenFromUrl() || localStorage.getItem("kota.token");
  if (token) start(token); else logout();
});
