// The city map on a canvas: thousands of points stay smooth (one path per colour, redrawn only
// when something changed). No tile server: districts are drawn as the outline (convex hull) of
// their own devices, labelled at their centre.

export const STATUS_COLOURS = { online: "#3fb950", stale: "#d29922", offline: "#f85149" };
const NO_ISPU = "#56606b";

function hull(points) {
  const p = [...points].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  if (p.length < 3) return p;
  const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
  const lower = [], upper = [];
  for (const q of p) { while (lower.length >= 2 && cross(lower.at(-2), lower.at(-1), q) <= 0) lower.pop(); lower.push(q); }
  for (const q of p.reverse()) { while (upper.length >= 2 && cross(upper.at(-2), upper.at(-1), q) <= 0) upper.pop(); upper.push(q); }
  return lower.slice(0, -1).concat(upper.slice(0, -1));
}

export class CityMap {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.devices = new Map();  // id -> {lon, lat, status, ispuHex, district}
    this.colourBy = "status";
    this.dirty = false;
    this.drawn = 0;  // how many times the map was drawn (the browser test watches it change)
  }

  setDevices(features) {
    this.devices.clear();
    for (const f of features) {
      if (!f.geometry) continue;
      const [lon, lat] = f.geometry.coordinates;
      const p = f.properties;
      this.devices.set(f.id, { lon, lat, status: p.status, district: p.district, ispuHex: p.ispu ? p.ispu.hex : null });
    }
    this.fit();
    this.invalidate();
  }

  markSeen(id) {
    const d = this.devices.get(id);
    if (d && d.status !== "online") { d.status = "online"; this.invalidate(); }
  }

  setColourBy(mode) { this.colourBy = mode; this.invalidate(); }

  invalidate() {
    if (this.dirty) return;
    this.dirty = true;
    requestAnimationFrame(() => { this.dirty = false; this.draw(); });
  }

  fit() {
    const lons = [...this.devices.values()].map((d) => d.lon), lats = [...this.devices.values()].map((d) => d.lat);
    if (!lons.length) { this.box = null; return; }
    const pad = 0.08;
    let [x0, x1, y0, y1] = [Math.min(...lons), Math.max(...lons), Math.min(...lats), Math.max(...lats)];
    const w = Math.max(x1 - x0, 0.01), h = Math.max(y1 - y0, 0.01);
    this.box = { x0: x0 - w * pad, x1: x1 + w * pad, y0: y0 - h * pad, y1: y1 + h * pad };
  }

  project(lon, lat) {
    const { x0, x1, y0, y1 } = this.box, W = this.canvas.width, H = this.canvas.height;
    const scale = Math.min(W / (x1 - x0), H / (y1 - y0));  // keep degrees square near the equator
    const ox = (W - (x1 - x0) * scale) / 2, oy = (H - (y1 - y0) * scale) / 2;
    return [ox + (lon - x0) * scale, H - oy - (lat - y0) * scale];
  }

  colour(d) { return this.colourBy === "ispu" ? (d.ispuHex || NO_ISPU) : STATUS_COLOURS[d.status] || NO_ISPU; }

  draw() {
    const { ctx, canvas } = this;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    this.drawn += 1;
    canvas.dataset.drawn = String(this.drawn);
    if (!this.box) return;
    const districts = new Map();
    for (const d of this.devices.values()) {
      const key = d.district || "—";
      if (!districts.has(key)) districts.set(key, []);
      districts.get(key).push(this.project(d.lon, d.lat));
    }
    ctx.lineWidth = 1;
    ctx.font = "12px system-ui";
    for (const [name, pts] of districts) {
      const outline = hull(pts);
      ctx.strokeStyle = "#2f3f4f"; ctx.fillStyle = "rgba(80,110,140,0.08)";
      if (outline.length >= 3) {
        ctx.beginPath(); outline.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
        ctx.closePath(); ctx.fill(); ctx.stroke();
      }
      const cx = pts.reduce((s, p) => s + p[0], 0) / pts.length, cy = pts.reduce((s, p) => s + p[1], 0) / pts.length;
      ctx.fillStyle = "#8b949e"; ctx.fillText(name, cx + 6, cy - 6);
    }
    const byColour = new Map();
    for (const d of this.devices.values()) {
      const c = this.colour(d);
      if (!byColour.has(c)) byColour.set(c, []);
      byColour.get(c).push(this.project(d.lon, d.lat));
    }
    const r = this.devices.size > 1000 ? 2.5 : 5;
    for (const [c, pts] of byColour) {
      ctx.fillStyle = c; ctx.beginPath();
      for (const [x, y] of pts) { ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 2 * Math.PI); }
      ctx.fill();
      if (isDark(c)) {  // ISPU Berbahaya is black: ringed, or the worst air vanishes into the map
        ctx.strokeStyle = "#e6edf3"; ctx.lineWidth = 1; ctx.stroke();
      }
    }
  }
}

// A colour too dark to see on the map's background (#rrggbb).
function isDark(colour) {
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(colour);
  if (!m) return false;
  const [r, g, b] = m.slice(1).map((h) => parseInt(h, 16));
  return 0.2126 * r + 0.7152 * g + 0.0722 * b < 48;
}
