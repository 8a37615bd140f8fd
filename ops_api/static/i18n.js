// Labels in Bahasa Indonesia (default) and English. Keys are used by data-i18n and by t().
export const LABELS = {
  id: {
    title: "Pusat Komando", city: "Kota", province: "Provinsi", logout: "Keluar", login: "Masuk",
    login_hint: "Tempel token API (kota users token NAMA).", enter: "Masuk", province_summary: "Ringkasan provinsi",
    worst_ispu: "ISPU terburuk", gates_siaga: "Pintu air Siaga", open_alerts: "Peringatan terbuka", offline: "Luring",
    map: "Peta perangkat", colour_by: "Warna", status: "Status", alerts: "Peringatan", air_quality: "Kualitas udara (ISPU)",
    water_levels: "Tinggi muka air", noise: "Kebisingan", traffic: "Lalu lintas", utilities: "Utilitas",
    street_lighting: "Penerangan jalan", live_feed: "Umpan langsung", readings_received: "Bacaan diterima",
    online: "Daring", stale: "Tertunda", acknowledge: "Akui", clear: "Tutup", no_alerts: "Tidak ada peringatan terbuka",
    devices: "perangkat", connected: "langsung: tersambung", disconnected: "langsung: terputus, menyambung ulang…",
    bad_token: "Token tidak berlaku.", limit: "batas", leak: "dugaan bocor", vs_baseline: "vs biasa",
    usual: "biasanya", congestion: "kemacetan", on: "nyala", off: "mati", fault: "rusak", rising: "naik cepat",
    acknowledged: "diakui", active: "aktif", no_data: "belum ada data",
    commands: "Perintah perangkat",
  },
  en: {
    title: "Command Centre", city: "City", province: "Province", logout: "Log out", login: "Sign in",
    login_hint: "Paste an API token (kota users token NAME).", enter: "Sign in", province_summary: "Province summary",
    worst_ispu: "Worst ISPU", gates_siaga: "Gates at Siaga", open_alerts: "Open alerts", offline: "Offline",
    map: "Device map", colour_by: "Colour", status: "Status", alerts: "Alerts", air_quality: "Air quality (ISPU)",
    water_levels: "Water levels", noise: "Noise", traffic: "Traffic", utilities: "Utilities",
    street_lighting: "Street lighting", live_feed: "Live feed", readings_received: "Readings received",
    online: "Online", stale: "Stale", acknowledge: "Acknowledge", clear: "Clear", no_alerts: "No open alerts",
    devices: "devices", connected: "live: connected", disconnected: "live: disconnected, reconnecting…",
    bad_token: "That token is not valid.", limit: "limit", leak: "suspected leak", vs_baseline: "vs usual",
    usual: "usual", congestion: "congestion", on: "on", off: "off", fault: "fault", rising: "rising fast",
    acknowledged: "acknowledged", active: "active", no_data: "no data yet",
    commands: "Device commands",
  },
};

let lang = localStorage.getItem("kota.lang") || "id";

export function t(key) { return (LABELS[lang] && LABELS[lang][key]) || LABELS.en[key] || key; }
export function language() { return lang; }

export function setLanguage(next) {
  lang = next;
  localStorage.setItem("kota.lang", next);
  document.documentElement.lang = next;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
}
