// The page's notifications panel: the city's channels and subscriptions, a form to add a
// subscription, "send a test" per channel, the latest deliveries; and the alert a message links to
// (#alert=<id>). Everything goes through /api/v1/notifications with the operator's token; secrets
// are never shown (the API never returns them).
const LABELS = {
  id: {
    title: "Pemberitahuan", channels: "Saluran", subscriptions: "Langganan", deliveries: "Pengiriman terakhir",
    test: "Kirim uji", add: "Tambah langganan", channel: "Saluran", min_severity: "Tingkat minimum",
    alert_types: "Jenis (koma)", district: "Kecamatan", language: "Bahasa", quiet: "Jam tenang",
    none: "belum ada", queued: "pesan uji diantrekan", added: "langganan ditambahkan", linked: "Peringatan dari pesan",
  },
  en: {
    title: "Notifications", channels: "Channels", subscriptions: "Subscriptions", deliveries: "Latest deliveries",
    test: "Send test", add: "Add subscription", channel: "Channel", min_severity: "Minimum severity",
    alert_types: "Types (comma)", district: "District", language: "Language", quiet: "Quiet hours",
    none: "none yet", queued: "test message queued", added: "subscription added", linked: "Alert from a message",
  },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

const row = (...cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c)));

export async function renderNotifications(root, api, city, language) {
  const L = LABELS[language] || LABELS.en;
  const q = `city=${encodeURIComponent(city)}`;
  const [channels, subscriptions, deliveries] = await Promise.all([
    api(`/api/v1/notifications/channels?${q}`), api(`/api/v1/notifications/subscriptions?${q}`),
    api(`/api/v1/notifications/deliveries?${q}&limit=10`)]);
  const status = el("p", { class: "muted", id: "notify-status" });
  const send = async (id) => {
    const queued = await api(`/api/v1/notifications/channels/${id}/test`, { method: "POST",
      body: JSON.stringify({ language }) });
    status.textContent = `${L.queued} (#${queued.message_id})`;
    setTimeout(() => renderNotifications(root, api, city, language), 2000);
  };
  const channelRows = channels.length ? channels.map((c) => row(`#${c.channel_id}`, c.name, c.kind,
    c.enabled ? "✓" : "✗", el("button", { class: "notify-test", "data-channel": c.channel_id,
      onclick: () => send(c.channel_id) }, L.test))) : [row(L.none)];
  const subscriptionRows = subscriptions.length ? subscriptions.map((s) => row(`#${s.subscription_id}`,
    `→ #${s.channel_id}`, `≥ ${s.min_severity}`, (s.alert_types || ["*"]).join(", "), s.district || "*",
    s.language, s.quiet_start ? `${s.quiet_start.slice(0, 5)}–${s.quiet_end.slice(0, 5)}` : "",
    s.tier > 1 ? `tier ${s.tier}` : "")) : [row(L.none)];
  const deliveryRows = deliveries.length ? deliveries.map((d) => row(`#${d.message_id}`, d.kind,
    d.alert_id ? `alert ${d.alert_id}` : "", el("span", { class: d.status === "sent" ? "ok" : d.status === "failed"
      ? "bad" : "muted" }, d.status), d.last_error || "")) : [row(L.none)];

  const select = el("select", { name: "channel_id" }, ...channels.map((c) => el("option", { value: c.channel_id },
    `#${c.channel_id} ${c.name}`)));
  const severity = el("select", { name: "min_severity" }, ...["warning", "minor", "major", "critical"].map((s) =>
    el("option", { value: s }, s)));
  const types = el("input", { name: "alert_types", placeholder: "flood_siaga, air_quality_unhealthy" });
  const district = el("input", { name: "district", placeholder: "regol" });
  const lang = el("select", { name: "language" }, el("option", { value: "id" }, "id"), el("option", { value: "en" }, "en"));
  lang.value = language;
  const form = el("form", { id: "notify-add" }, el("label", {}, `${L.channel} `, select), " ",
    el("label", {}, `${L.min_severity} `, severity), " ", el("label", {}, `${L.alert_types} `, types), " ",
    el("label", {}, `${L.district} `, district), " ", el("label", {}, `${L.language} `, lang), " ",
    el("button", { type: "submit" }, L.add));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const alertTypes = types.value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      await api("/api/v1/notifications/subscriptions", { method: "POST", body: JSON.stringify({
        channel_id: Number(select.value), min_severity: severity.value, language: lang.value,
        alert_types: alertTypes.length ? alertTypes : null, district: district.value.trim() || null }) });
      await renderNotifications(root, api, city, language);
      root.querySelector("#notify-status").textContent = L.added;
    } catch (error) { status.textContent = String(error.message || error); }
  };
  root.replaceChildren(el("h2", {}, L.title),
    el("h3", {}, L.channels), el("table", {}, el("tbody", { id: "notify-channels" }, ...channelRows)),
    el("h3", {}, L.subscriptions), el("table", {}, el("tbody", { id: "notify-subscriptions" }, ...subscriptionRows)),
    channels.length ? form : "", status,
    el("h3", {}, L.deliveries), el("table", {}, el("tbody", { id: "notify-deliveries" }, ...deliveryRows)));
}

// A message's link: <page>/#alert=<id>. Show that alert with its history above the lists.
export function linkedAlertId() {
  const match = location.hash.match(/alert=(\d+)/);
  return match ? Number(match[1]) : null;
}

export async function showLinkedAlert(root, api, language) {
  const id = linkedAlertId();
  if (!id) return null;
  const L = LABELS[language] || LABELS.en;
  const alert = await api(`/api/v1/alerts/${id}`);
  root.hidden = false;
  root.replaceChildren(el("h2", {}, `${L.linked} #${alert.alert_id}`),
    el("p", {}, el("b", {}, alert.alert_type), ` · ${alert.device_id} · ${alert.district || ""} · ${alert.severity}`
      + ` · ${alert.state}`),
    el("p", {}, alert.message),
    el("ul", {}, ...alert.history.map((h) => el("li", {}, `${h.at} ${h.action} ${h.actor} ${h.comment || ""}`))));
  return alert;
}
