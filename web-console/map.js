// The Map view: each unit at its last reported position with its heading and state, its
// last ten minutes as a trail, and each active operation's fence. Web-Mercator in one SVG;
// raster tiles under it when a tile server is configured, else a plain grid with a scale
// bar: a command centre's network may reach no tile server at all.
import { fmtTime } from "./cases.js";
import { HubError, hubFetch } from "./player.js";

// Positions are pushed over the session (a batch a second); reading them back from the hub
// fills the trail on opening and catches up after a dropped session.
const POLL_MS = 15_000;
// Operations change rarely; their list is read less often than positions.
const CASES_MS = 10_000;
const TRAIL_US = 10 * 60 * 1_000_000;
// The hub stores telemetry in batches, so a point can appear after a later one was read:
// each poll reads again this far back from the newest point it has.
const OVERLAP_US = 30_000_000;
// A fix older than this is drawn faded: the unit is not where the marker says any more.
const STALE_US = 60_000_000;
const TILE = 256;
const MIN_ZOOM = 1;
const MAX_ZOOM = 19;
// Fitting a single point (or a small fence) stops at street level, not at the max zoom.
const FIT_MAX_ZOOM = 17;
const FIT_PAD = 48;
// Earth's equatorial circumference (WGS 84), metres: the width of the Web-Mercator world.
const EARTH_M = 40_075_016.686;
const MAX_LAT = 85.05112878;
const TILES_KEY = "tianwang.tiles";
const NS = "http://www.w3.org/2000/svg";

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

/// Web-Mercator: latitude and longitude in degrees → the world square [0, 1]², y down.
export function project(lat, lon) {
  const phi = (clamp(lat, -MAX_LAT, MAX_LAT) * Math.PI) / 180;
  return {
    x: (lon + 180) / 360,
    y: 0.5 - Math.log(Math.tan(Math.PI / 4 + phi / 2)) / (2 * Math.PI),
  };
}

export function unproject(x, y) {
  return { lat: (Math.atan(Math.sinh(Math.PI * (1 - 2 * y))) * 180) / Math.PI, lon: x * 360 - 180 };
}

/// Metres in one world width at `lat` (Mercator stretches by 1/cos(lat)).
const metresPerWorld = (lat) => EARTH_M * Math.cos((lat * Math.PI) / 180);

/// The largest 1, 2 or 5 × 10^n not above `v`.
function niceBelow(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [5, 2, 1].map((m) => m * p).find((n) => n <= v) ?? p;
}

/// A tile template is usable when it is http(s) or same-origin and names z, x and y.
export function validTemplate(t) {
  return /^(https?:\/\/|\/)/i.test(t) && ["{z}", "{x}", "{y}"].every((k) => t.includes(k));
}

export const tileUrl = (template, z, x, y) =>
  template.replaceAll("{z}", z).replaceAll("{x}", x).replaceAll("{y}", y);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs = {}, cls = "") {
  const e = document.createElementNS(NS, tag);
  if (cls) e.setAttribute("class", cls);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

const fmtDist = (m) => (m >= 1000 ? `${m / 1000} km` : `${m} m`);
const byUnit = (a, b) => a.localeCompare(b, undefined, { numeric: true });
const hasFix = (p) => p != null && p.latitude != null && p.longitude != null;

function age(us) {
  const s = Math.max(0, Math.round((Date.now() * 1000 - us) / 1e6));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : fmtTime(us);
}

export class MapView {
  /// `wall` knows the units and their online state (from the session); `onWatch(unit)` puts
  /// a unit on the wall; `alarmUnits()` names the units with an alarm not yet resolved.
  constructor(session, wall, token, root, { onWatch, alarmUnits }) {
    this.wall = wall;
    this.token = token;
    this.root = root;
    this.onWatch = onWatch;
    this.alarmUnits = alarmUnits;
    this.q = (sel) => root.querySelector(sel);
    this.box = this.q("#map");
    this.tracks = new Map();
    this.operations = [];
    this.casesAt = 0;
    this.view = { x: 0.5, y: 0.5, z: 2 };
    this.size = { W: 0, H: 0 };
    // Until the user pans or zooms, the view keeps every marker and fence in sight.
    this.follow = true;
    this.fitted = false;
    this.visible = false;
    this.polls = 0;
    this.pushes = 0;
    this.errors = [];
    this.timer = null;
    this.inflight = null;
    this.frame = 0;
    this.template = localStorage.getItem(TILES_KEY) || "";
    this.tileNodes = new Map();
    this.tileStats = { requested: new Set(), loaded: new Set(), failed: new Set() };
    this.markerNodes = new Map();
    this.sideItems = new Map();
    this.drawn = { grid: 0, scale: null };
    this.drag = null;
    this.dragged = false;

    const s = svg("svg", { width: "100%", height: "100%" });
    s.id = "map-svg";
    this.layers = {};
    for (const name of ["grid", "tiles", "fences", "trails", "markers"]) {
      this.layers[name] = svg("g", {}, `layer-${name}`);
      s.append(this.layers[name]);
    }
    this.svg = s;
    this.box.prepend(s);

    this.box.addEventListener("wheel", (e) => this.onWheel(e), { passive: false });
    s.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    s.addEventListener("pointermove", (e) => this.onPointerMove(e));
    s.addEventListener("pointerup", (e) => this.onPointerUp(e));
    s.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.box.addEventListener("keydown", (e) => this.onKey(e));
    this.q("#map-zoom-in").onclick = () => this.zoomBy(1);
    this.q("#map-zoom-out").onclick = () => this.zoomBy(-1);
    this.q("#map-fit").onclick = () => this.refit();
    this.q("#tile-url").value = this.template;
    this.q("#tile-form").onsubmit = (e) => {
      e.preventDefault();
      this.setTiles(this.q("#tile-url").value);
    };
    this.q("#tile-clear").onclick = () => this.setTiles("");
    new ResizeObserver(() => this.draw()).observe(this.box);
    const refresh = () => this.changed();
    session.addEventListener("ready", refresh);
    session.addEventListener("unit", refresh);
    session.addEventListener("telemetry", (e) => this.pushed(e.detail));
  }

  /// A batch of pushed telemetry, as /api/telemetry rows.
  pushed(points) {
    const now = Date.now() * 1000;
    for (const { unitId, telemetry: t = {}, receivedUs } of points) {
      const p = t.position;
      const row = {
        unit: unitId, at_us: Number(t.timestampUs ?? 0), received_us: Number(receivedUs ?? 0),
        latitude: p ? p.latitude ?? 0 : null, longitude: p ? p.longitude ?? 0 : null,
        accuracy_m: p ? p.accuracyM ?? 0 : null, speed_mps: p ? p.speedMps ?? 0 : null,
        heading_deg: p ? p.headingDeg ?? 0 : null, battery_percent: t.batteryPercent ?? 0,
        signal_dbm: t.signalDbm ?? 0, storage_free_bytes: Number(t.storageFreeBytes ?? 0),
        recording: t.recording ? 1 : 0, sos: t.sos ? 1 : 0,
      };
      const track = this.track(unitId);
      const had = track.byAt.has(row.at_us);
      track.byAt.set(row.at_us, row);
      for (const at of track.byAt.keys()) if (at < now - TRAIL_US) track.byAt.delete(at);
      if (row.at_us >= track.newestUs) {
        track.last = row;
        track.newestUs = row.at_us;
      }
      if (hasFix(row) && !had) {
        track.trail.push(row);
        track.trail = track.trail.filter((x) => x.at_us >= now - TRAIL_US)
          .sort((a, b) => a.at_us - b.at_us);
        track.fix = track.trail.at(-1);
      }
    }
    this.pushes += 1;
    if (this.visible) this.changed();
  }

  /// The map is polled only while it is shown: a hundred units at 2 s is fifty requests a
  /// second nobody looks at otherwise.
  show() {
    this.visible = true;
    clearInterval(this.timer);
    this.timer = setInterval(() => this.poll().catch(() => {}), POLL_MS);
    this.draw();
    return this.poll();
  }

  hide() {
    this.visible = false;
    clearInterval(this.timer);
    this.timer = null;
  }

  poll() {
    this.inflight ??= this.pollOnce().finally(() => { this.inflight = null; });
    return this.inflight;
  }

  async pollOnce() {
    const now = Date.now() * 1000;
    const problems = [];
    if (Date.now() - this.casesAt >= CASES_MS) {
      try {
        await this.loadOperations();
        this.casesAt = Date.now();
        // Fences (and units that never connected) show before the positions come in.
        this.changed();
      } catch (e) {
        problems.push(`operations: ${this.describe(e)}`);
      }
    }
    await Promise.all(this.unitIds().map((u) =>
      this.loadTrack(u, now).catch((e) => problems.push(`${u}: ${this.describe(e)}`))));
    this.polls += 1;
    this.errors.push(...problems);
    this.errors.splice(0, Math.max(0, this.errors.length - 20));
    this.q("#map-error").textContent = problems.join("; ");
    this.changed();
    return this.state();
  }

  describe(e) {
    return e instanceof HubError ? `${e.status}: ${e.message}` : e.message;
  }

  /// Open operations of this hub and of the courts below (any console role may read them).
  async loadOperations() {
    const body = await (await hubFetch("/api/operations", this.token)).json();
    this.operations = (body.operations ?? []).map((o) => ({
      id: o.id,
      caseNumber: o.case_number,
      court: o.court,
      name: o.name ?? "",
      lat: o.latitude ?? 0,
      lon: o.longitude ?? 0,
      radiusM: o.radius_m ?? 0,
      units: o.units ?? [],
      startsUs: Number(o.starts_us ?? 0),
      endsUs: Number(o.ends_us ?? 0),
      state: o.state ?? "",
    }));
  }

  /// Operations going on now; an operation ends on the map when its window does, between
  /// two reads of the list.
  fences(now = Date.now() * 1000) {
    return this.operations.filter((o) => o.state === "planned" && o.startsUs <= now && now < o.endsUs);
  }

  /// The units the session knows, and those of active operations that never connected.
  unitIds() {
    const ids = new Set(this.wall.units.keys());
    for (const f of this.fences()) for (const u of f.units) ids.add(u);
    return [...ids].sort(byUnit);
  }

  track(unit) {
    let t = this.tracks.get(unit);
    if (!t) {
      t = { unit, byAt: new Map(), newestUs: 0, last: null, fix: null, trail: [] };
      this.tracks.set(unit, t);
    }
    return t;
  }

  async loadTrack(unit, now) {
    const t = this.track(unit);
    const from = Math.floor(Math.max(now - TRAIL_US, t.newestUs - OVERLAP_US));
    const url = `/api/telemetry?unit=${encodeURIComponent(unit)}&from_us=${from}`;
    const body = await (await hubFetch(url, this.token)).json();
    for (const p of body.points ?? []) t.byAt.set(p.at_us, p);
    for (const at of t.byAt.keys()) if (at < now - TRAIL_US) t.byAt.delete(at);
    const points = [...t.byAt.values()].sort((a, b) => a.at_us - b.at_us);
    if (points.length) {
      t.last = points.at(-1);
      t.newestUs = t.last.at_us;
    }
    t.trail = points.filter(hasFix);
    // The last fix stays on the map (faded) after it leaves the ten minutes.
    if (t.trail.length) t.fix = t.trail.at(-1);
  }

  unitState(unit) {
    const alarmed = this.alarmUnits().has(unit) || this.tracks.get(unit)?.last?.sos === 1;
    if (alarmed) return "alarm";
    return this.wall.units.get(unit)?.online ? "online" : "offline";
  }

  setTiles(template) {
    const t = template.trim();
    const error = this.q("#tile-error");
    if (t && !validTemplate(t)) {
      error.textContent = "A tile URL starts with http(s):// or / and contains {z}, {x} and {y}.";
      return false;
    }
    error.textContent = "";
    this.template = t;
    if (t) localStorage.setItem(TILES_KEY, t);
    else localStorage.removeItem(TILES_KEY);
    this.q("#tile-url").value = t;
    for (const n of this.tileNodes.values()) n.remove();
    this.tileNodes.clear();
    this.tileStats = { requested: new Set(), loaded: new Set(), failed: new Set() };
    this.draw();
    return true;
  }

  /// New data: fit the view when it follows and something is out of sight, then draw.
  changed() {
    this.measure();
    if (this.follow && this.size.W && (!this.fitted || !this.allInView())) this.fitted = this.fit();
    this.renderSide();
    this.draw();
  }

  measure() {
    const r = this.box.getBoundingClientRect();
    this.size = { W: r.width, H: r.height };
  }

  scale() {
    return TILE * 2 ** this.view.z;
  }

  /// Screen position (px in the map box) of a latitude and longitude.
  px(lat, lon) {
    const p = project(lat, lon);
    const s = this.scale();
    return [(p.x - this.view.x) * s + this.size.W / 2, (p.y - this.view.y) * s + this.size.H / 2];
  }

  /// The world bounds of what the map shows: fixes, trails and fences.
  bounds() {
    let b = null;
    const add = (x0, y0, x1 = x0, y1 = y0) => {
      b = b ? { x0: Math.min(b.x0, x0), y0: Math.min(b.y0, y0), x1: Math.max(b.x1, x1),
        y1: Math.max(b.y1, y1) } : { x0, y0, x1, y1 };
    };
    for (const t of this.tracks.values()) {
      for (const p of [...t.trail, t.fix].filter(hasFix)) {
        const w = project(p.latitude, p.longitude);
        add(w.x, w.y);
      }
    }
    for (const f of this.fences()) {
      const w = project(f.lat, f.lon);
      const r = f.radiusM / metresPerWorld(f.lat);
      add(w.x - r, w.y - r, w.x + r, w.y + r);
    }
    return b;
  }

  allInView() {
    const b = this.bounds();
    if (!b) return true;
    const s = this.scale();
    const { W, H } = this.size;
    const sx = (x) => (x - this.view.x) * s + W / 2;
    const sy = (y) => (y - this.view.y) * s + H / 2;
    return sx(b.x0) >= 0 && sx(b.x1) <= W && sy(b.y0) >= 0 && sy(b.y1) <= H;
  }

  fit() {
    const b = this.bounds();
    if (!b || !this.size.W) return false;
    const w = Math.max(b.x1 - b.x0, 1e-12);
    const h = Math.max(b.y1 - b.y0, 1e-12);
    const room = (n) => Math.max(n - 2 * FIT_PAD, 32);
    const z = Math.log2(Math.min(room(this.size.W) / (w * TILE), room(this.size.H) / (h * TILE)));
    this.view = { x: (b.x0 + b.x1) / 2, y: (b.y0 + b.y1) / 2, z: clamp(z, MIN_ZOOM, FIT_MAX_ZOOM) };
    return true;
  }

  refit() {
    this.follow = true;
    this.fitted = false;
    this.changed();
  }

  /// Centres on a latitude and longitude; the view stops following.
  centre(lat, lon, z = this.view.z) {
    const p = project(lat, lon);
    this.follow = false;
    this.view = { x: p.x, y: p.y, z: clamp(z, MIN_ZOOM, MAX_ZOOM) };
    this.draw();
  }

  /// Zooms by `dz` keeping the world point under screen point (mx, my) in place.
  zoomBy(dz, mx = this.size.W / 2, my = this.size.H / 2) {
    const s0 = this.scale();
    const wx = this.view.x + (mx - this.size.W / 2) / s0;
    const wy = this.view.y + (my - this.size.H / 2) / s0;
    const z = clamp(this.view.z + dz, MIN_ZOOM, MAX_ZOOM);
    const s1 = TILE * 2 ** z;
    this.follow = false;
    this.view = { x: wx - (mx - this.size.W / 2) / s1, y: wy - (my - this.size.H / 2) / s1, z };
    this.draw();
  }

  panBy(dx, dy) {
    const s = this.scale();
    this.follow = false;
    this.view = { ...this.view, x: this.view.x - dx / s, y: clamp(this.view.y - dy / s, 0, 1) };
    this.draw();
  }

  onWheel(e) {
    e.preventDefault();
    const r = this.box.getBoundingClientRect();
    const lines = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;
    this.zoomBy(clamp((-e.deltaY * lines) / 300, -1, 1), e.clientX - r.left, e.clientY - r.top);
  }

  // A press becomes a drag only once it moves: until then no pointer capture, so a click on a
  // marker still reaches the marker.
  onPointerDown(e) {
    if (e.button !== 0) return;
    this.drag = { id: e.pointerId, x: e.clientX, y: e.clientY, moving: false };
    this.dragged = false;
  }

  onPointerMove(e) {
    const d = this.drag;
    if (!d || d.id !== e.pointerId) return;
    if (!d.moving && Math.hypot(e.clientX - d.x, e.clientY - d.y) < 4) return;
    if (!d.moving) {
      d.moving = true;
      this.svg.setPointerCapture(e.pointerId);
      this.box.classList.add("dragging");
    }
    this.panBy(e.clientX - d.x, e.clientY - d.y);
    d.x = e.clientX;
    d.y = e.clientY;
  }

  onPointerUp(e) {
    if (this.drag?.moving) {
      this.dragged = true;
      this.box.classList.remove("dragging");
      if (this.svg.hasPointerCapture(e.pointerId)) this.svg.releasePointerCapture(e.pointerId);
    }
    this.drag = null;
  }

  onKey(e) {
    if (e.target !== this.box) return;
    const step = 80;
    const keys = {
      ArrowLeft: () => this.panBy(step, 0),
      ArrowRight: () => this.panBy(-step, 0),
      ArrowUp: () => this.panBy(0, step),
      ArrowDown: () => this.panBy(0, -step),
      "+": () => this.zoomBy(1),
      "=": () => this.zoomBy(1),
      "-": () => this.zoomBy(-1),
      f: () => this.refit(),
    };
    if (!keys[e.key] || e.ctrlKey || e.metaKey || e.altKey) return;
    e.preventDefault();
    keys[e.key]();
  }

  watch(unit) {
    this.onWatch(unit);
  }

  draw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render() {
    this.measure();
    if (!this.size.W || !this.size.H) return;
    this.svg.setAttribute("viewBox", `0 0 ${this.size.W} ${this.size.H}`);
    this.renderGrid();
    this.renderTiles();
    this.renderFences();
    this.renderTrails();
    this.renderMarkers();
    this.renderScale();
    this.q("#map-source").textContent = this.template
      ? `tiles: ${this.template.replace(/^https?:\/\//, "").split("/")[0] || "this hub"}`
      : "no tile server: grid";
  }

  /// Meridians and parallels every 1, 2 or 5 × 10^n degrees, 64 to 160 px apart.
  renderGrid() {
    const layer = this.layers.grid;
    const { W, H } = this.size;
    const s = this.scale();
    const step = niceBelow((360 / s) * 160);
    const digits = Math.max(0, -Math.floor(Math.log10(step)));
    const nw = unproject(this.view.x - W / 2 / s, this.view.y - H / 2 / s);
    const se = unproject(this.view.x + W / 2 / s, this.view.y + H / 2 / s);
    const nodes = [svg("rect", { x: 0, y: 0, width: W, height: H }, "ground")];
    let lines = 0;
    for (let k = Math.ceil(nw.lon / step); k * step <= se.lon && lines < 80; k++, lines++) {
      const lon = k * step;
      const [x] = this.px(0, lon);
      nodes.push(svg("line", { x1: x, y1: 0, x2: x, y2: H }, "grid"));
      // Along the top: the bottom edge has the scale bar and the tile source.
      const label = svg("text", { x: x + 3, y: 12 }, "grid-label");
      label.textContent = `${lon.toFixed(digits)}°`;
      nodes.push(label);
    }
    for (let k = Math.ceil(Math.max(se.lat, -MAX_LAT) / step); k * step <= Math.min(nw.lat, MAX_LAT)
      && lines < 160; k++, lines++) {
      const lat = k * step;
      const [, y] = this.px(lat, 0);
      nodes.push(svg("line", { x1: 0, y1: y, x2: W, y2: y }, "grid"));
      // A label clear of the longitudes along the top.
      if (y < 24) continue;
      const label = svg("text", { x: 4, y: y - 3 }, "grid-label");
      label.textContent = `${lat.toFixed(digits)}°`;
      nodes.push(label);
    }
    layer.replaceChildren(...nodes);
    this.drawn.grid = lines;
  }

  /// Standard slippy-map tiles (z/x/y, 256 px) at the zoom nearest the view's, scaled to it.
  renderTiles() {
    const layer = this.layers.tiles;
    if (!this.template) {
      layer.replaceChildren();
      return;
    }
    const { W, H } = this.size;
    const s = this.scale();
    const tz = clamp(Math.round(this.view.z), 0, MAX_ZOOM);
    const n = 2 ** tz;
    const size = s / n;
    const left = this.view.x - W / 2 / s;
    const top = this.view.y - H / 2 / s;
    const want = new Set();
    const tx0 = Math.floor(left * n);
    const tx1 = Math.floor((left + W / s) * n);
    const ty0 = Math.max(0, Math.floor(top * n));
    const ty1 = Math.min(n - 1, Math.floor((top + H / s) * n));
    for (let ty = ty0; ty <= ty1; ty++) {
      for (let tx = tx0; tx <= tx1; tx++) {
        const wrapped = ((tx % n) + n) % n;
        const key = `${tz}/${wrapped}/${ty}`;
        want.add(key);
        let node = this.tileNodes.get(key);
        if (!node) {
          node = svg("image", { preserveAspectRatio: "none" }, "tile");
          node.dataset.key = key;
          node.addEventListener("load", () => this.tileStats.loaded.add(key));
          node.addEventListener("error", () => {
            // A missing tile shows the grid beneath it rather than a broken image.
            this.tileStats.failed.add(key);
            node.setAttribute("visibility", "hidden");
          });
          node.setAttribute("href", tileUrl(this.template, tz, wrapped, ty));
          this.tileStats.requested.add(key);
          this.tileNodes.set(key, node);
        }
        // Half a pixel of overlap hides the seams between scaled tiles.
        node.setAttribute("x", ((tx / n - this.view.x) * s + W / 2).toFixed(1));
        node.setAttribute("y", ((ty / n - this.view.y) * s + H / 2).toFixed(1));
        node.setAttribute("width", (size + 0.5).toFixed(1));
        node.setAttribute("height", (size + 0.5).toFixed(1));
        if (node.parentNode !== layer) layer.append(node);
      }
    }
    for (const [key, node] of this.tileNodes) {
      if (!want.has(key)) {
        node.remove();
        this.tileNodes.delete(key);
      }
    }
  }

  renderFences() {
    const s = this.scale();
    this.layers.fences.replaceChildren(...this.fences().map((f) => {
      const [cx, cy] = this.px(f.lat, f.lon);
      const r = (f.radiusM / metresPerWorld(f.lat)) * s;
      const g = svg("g", {}, "fence");
      g.dataset.id = f.id;
      const title = svg("title");
      title.textContent = `${f.caseNumber} · ${f.name || f.id} · ${Math.round(f.radiusM)} m · `
        + `${f.units.join(", ")} · until ${fmtTime(f.endsUs)}`;
      g.append(title);
      if (f.radiusM > 0) g.append(svg("circle", { cx, cy, r }, "fence-area"));
      g.append(svg("path", { d: `M${cx - 5},${cy}h10M${cx},${cy - 5}v10` }, "fence-centre"));
      const label = svg("text", { x: cx, y: cy - Math.max(r, 8) - 6 }, "fence-label");
      label.textContent = f.name || f.id;
      g.append(label);
      return g;
    }));
  }

  renderTrails() {
    const nodes = [];
    for (const t of this.tracks.values()) {
      if (t.trail.length < 2) continue;
      const points = t.trail.map((p) => this.px(p.latitude, p.longitude).map((v) => v.toFixed(1)).join(","));
      const line = svg("polyline", { points: points.join(" ") }, `trail u-${this.unitState(t.unit)}`);
      line.dataset.unit = t.unit;
      nodes.push(line);
    }
    this.layers.trails.replaceChildren(...nodes);
  }

  // Markers are kept between draws (moved, not rebuilt) so keyboard focus stays on them.
  renderMarkers() {
    const now = Date.now() * 1000;
    const s = this.scale();
    const live = new Set();
    for (const t of [...this.tracks.values()].sort((a, b) => byUnit(a.unit, b.unit))) {
      const p = t.fix;
      if (!hasFix(p)) continue;
      live.add(t.unit);
      let m = this.markerNodes.get(t.unit);
      if (!m) m = this.makeMarker(t.unit);
      const [x, y] = this.px(p.latitude, p.longitude);
      const state = this.unitState(t.unit);
      const stale = now - p.at_us > STALE_US;
      m.g.setAttribute("class", `marker u-${state}${stale ? " stale" : ""}`);
      m.g.setAttribute("transform", `translate(${x.toFixed(1)} ${y.toFixed(1)})`);
      const acc = p.accuracy_m ? (p.accuracy_m / metresPerWorld(p.latitude)) * s : 0;
      m.acc.setAttribute("r", acc.toFixed(1));
      m.acc.setAttribute("visibility", acc >= 9 ? "visible" : "hidden");
      const heading = p.heading_deg;
      m.heading.setAttribute("visibility", heading != null ? "visible" : "hidden");
      m.heading.setAttribute("transform", `rotate(${(heading ?? 0).toFixed(0)})`);
      const where = `${p.latitude.toFixed(5)}, ${p.longitude.toFixed(5)}`;
      m.g.setAttribute("aria-label", `${t.unit}, ${state}, at ${where}, ${age(p.at_us)}`
        + `${heading != null ? `, heading ${Math.round(heading)}°` : ""}; Enter to watch`);
      m.title.textContent = `${t.unit} (${state}) ${where} · ${age(p.at_us)} · click to watch`;
      if (m.g.parentNode !== this.layers.markers) this.layers.markers.append(m.g);
    }
    for (const [unit, m] of this.markerNodes) {
      if (!live.has(unit)) {
        m.g.remove();
        this.markerNodes.delete(unit);
      }
    }
  }

  makeMarker(unit) {
    const g = svg("g", { tabindex: 0, role: "button" });
    g.dataset.unit = unit;
    const title = svg("title");
    const acc = svg("circle", { r: 0 }, "accuracy");
    // An arrow ahead of the dot, pointing where the unit is heading (0° = north).
    const heading = svg("path", { d: "M0,-19 L6,-9 L-6,-9 Z" }, "heading");
    const dot = svg("circle", { r: 7 }, "dot");
    const label = svg("text", { x: 11, y: 4 }, "label");
    label.textContent = unit;
    g.append(title, acc, heading, dot, label);
    g.addEventListener("click", (e) => {
      e.stopPropagation();
      // The end of a drag that began on a marker is not a click on it.
      if (!this.dragged) this.watch(unit);
      this.dragged = false;
    });
    g.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        this.watch(unit);
      }
    });
    const m = { g, title, acc, heading };
    this.markerNodes.set(unit, m);
    return m;
  }

  /// A bar of 1, 2 or 5 × 10^n metres, at most 140 px, at the view's centre latitude.
  renderScale() {
    const lat = unproject(this.view.x, this.view.y).lat;
    const mPerPx = metresPerWorld(lat) / this.scale();
    const metres = niceBelow(140 * mPerPx);
    const px = metres / mPerPx;
    this.q("#map-scale .bar").style.width = `${px.toFixed(1)}px`;
    this.q("#map-scale .label").textContent = fmtDist(metres);
    this.drawn.scale = { metres, px };
  }

  /// The side list: every unit, with its position or "no position yet", and Watch.
  renderSide() {
    const list = this.q("#map-units");
    const ids = this.unitIds();
    for (const [unit, item] of this.sideItems) {
      if (!ids.includes(unit)) {
        item.li.remove();
        this.sideItems.delete(unit);
      }
    }
    ids.forEach((unit, i) => {
      let item = this.sideItems.get(unit);
      if (!item) item = this.makeSideItem(unit);
      const t = this.tracks.get(unit);
      const state = this.unitState(unit);
      item.li.className = `u-${state}`;
      item.state.textContent = state;
      item.info.textContent = this.describeFix(t);
      item.locate.disabled = !hasFix(t?.fix);
      if (list.children[i] !== item.li) list.insertBefore(item.li, list.children[i] ?? null);
    });
    const placed = ids.filter((u) => hasFix(this.tracks.get(u)?.fix)).length;
    this.q("#map-count").textContent = `${placed}/${ids.length} placed`;
    this.q("#map-fences").replaceChildren(...this.fences().map((f) => {
      const b = el("button", "fence-item");
      b.append(el("span", "", f.name || f.id), el("span", "muted",
        ` ${f.caseNumber} · ${Math.round(f.radiusM)} m · ${f.units.join(", ")}`));
      b.onclick = () => this.centre(f.lat, f.lon);
      const li = el("li");
      li.append(b);
      return li;
    }));
    if (!this.fences().length) this.q("#map-fences").append(el("li", "muted", "None active."));
  }

  describeFix(t) {
    if (!t || !this.polls) return "…";
    if (!hasFix(t.fix)) {
      return t.last ? `no position yet (telemetry ${age(t.last.at_us)})` : "no position yet";
    }
    const p = t.fix;
    const parts = [`${p.latitude.toFixed(5)}, ${p.longitude.toFixed(5)}`];
    if (p.speed_mps != null) parts.push(`${p.speed_mps.toFixed(1)} m/s`);
    parts.push(age(p.at_us));
    const last = t.last ?? p;
    if (last.battery_percent) parts.push(`battery ${Math.round(last.battery_percent)}%`);
    if (last.sos) parts.push("SOS");
    return parts.join(" · ");
  }

  makeSideItem(unit) {
    const li = el("li");
    li.dataset.unit = unit;
    const locate = el("button", "locate", unit);
    locate.title = `Centre the map on ${unit}`;
    locate.onclick = () => {
      const p = this.tracks.get(unit)?.fix;
      if (hasFix(p)) this.centre(p.latitude, p.longitude, Math.max(this.view.z, 16));
    };
    const watch = el("button", "watch", "Watch");
    watch.title = `Show ${unit} on the wall`;
    watch.onclick = () => this.watch(unit);
    const state = el("span", "state");
    const info = el("span", "info muted");
    li.append(el("span", "dot"), locate, state, watch, info);
    const item = { li, locate, state, info };
    this.sideItems.set(unit, item);
    return item;
  }

  /// Plain data for tests.
  state() {
    const centre = unproject(this.view.x, this.view.y);
    const markers = [...this.tracks.values()].filter((t) => hasFix(t.fix)).map((t) => {
      const [x, y] = this.px(t.fix.latitude, t.fix.longitude);
      return { unit: t.unit, state: this.unitState(t.unit), lat: t.fix.latitude,
        lon: t.fix.longitude, headingDeg: t.fix.heading_deg, atUs: t.fix.at_us,
        trail: t.trail.length, x, y };
    });
    const s = this.scale();
    return {
      visible: this.visible,
      polls: this.polls,
      pushes: this.pushes,
      view: { lat: centre.lat, lon: centre.lon, zoom: this.view.z, width: this.size.W,
        height: this.size.H, follow: this.follow },
      units: this.unitIds().map((u) => ({ unit: u, state: this.unitState(u),
        placed: hasFix(this.tracks.get(u)?.fix), points: this.tracks.get(u)?.byAt.size ?? 0 })),
      markers,
      noPosition: this.unitIds().filter((u) => !hasFix(this.tracks.get(u)?.fix)),
      fences: this.fences().map((f) => {
        const [x, y] = this.px(f.lat, f.lon);
        return { id: f.id, caseNumber: f.caseNumber, lat: f.lat, lon: f.lon, radiusM: f.radiusM,
          units: [...f.units], x, y, r: (f.radiusM / metresPerWorld(f.lat)) * s };
      }),
      tiles: { template: this.template,
        drawn: [...this.tileNodes.keys()].filter((k) => this.tileStats.loaded.has(k)).length,
        shown: this.tileNodes.size, requested: [...this.tileStats.requested],
        loaded: this.tileStats.loaded.size, failed: this.tileStats.failed.size },
      grid: this.drawn.grid,
      scale: this.drawn.scale,
      errors: [...this.errors],
    };
  }
}
