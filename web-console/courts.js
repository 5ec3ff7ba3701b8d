// The court tree: the user's court at the root, the courts below it nested by parent, each
// with the units connected to its hub. Built from the session's ready event (court, courts,
// units) and kept live by its `courts` and `unit` events. A click on a unit watches it on the
// wall (a higher court drills down to any unit below it); its ⚑ button opens the directives.

const TIERS = { TIER_SUPREME: "supreme", TIER_HIGH: "high", TIER_INTERMEDIATE: "intermediate" };
const RENDER_MS = 50;

const fmtRate = (bps) =>
  bps >= 1e6 ? `${(bps / 1e6).toFixed(1)} Mb/s` : `${Math.round((bps || 0) / 1e3)} kb/s`;
const byCode = (a, b) => a.localeCompare(b, undefined, { numeric: true });

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/// Makes `parent`'s children exactly `kids`, in order, moving only what is out of place (so a
/// focused button or an open <details> survives an update).
function place(parent, kids) {
  kids.forEach((k, i) => {
    if (parent.children[i] !== k) parent.insertBefore(k, parent.children[i] ?? null);
  });
  while (parent.children.length > kids.length) parent.lastElementChild.remove();
}

export class CourtTree {
  constructor(session, root, count, { onWatch, onDirect } = {}) {
    this.root = root;
    this.count = count;
    this.onWatch = onWatch ?? (() => {});
    this.onDirect = onDirect ?? (() => {});
    this.court = "";
    this.hubId = "";
    this.courts = new Map();
    this.units = new Map();
    this.nodes = new Map();
    this.items = new Map();
    this.collapsed = new Set();
    this.filter = "";
    this.selected = null;
    this.timer = null;
    this.renders = 0;
    session.addEventListener("ready", (e) => {
      const r = e.detail;
      this.court = r.court ?? "";
      this.hubId = r.hubId ?? "";
      this.setCourts(r.courts ?? []);
      this.units.clear();
      for (const u of r.units ?? []) this.units.set(u.unitId, { ...u, online: Boolean(u.online) });
      this.render();
    });
    session.addEventListener("unit", (e) => {
      const u = e.detail;
      const known = this.units.get(u.unitId) ?? {};
      this.units.set(u.unitId, { ...known, ...u, stats: u.stats ?? known.stats,
        court: u.court || known.court, online: Boolean(u.online) });
      this.schedule();
    });
    session.addEventListener("courts", (e) => {
      this.setCourts(e.detail);
      this.schedule();
    });
  }

  setCourts(list) {
    this.courts.clear();
    for (const c of list) if (c.code) this.courts.set(c.code, { ...c, parent: c.parent ?? "" });
  }

  /// Unit events come every few seconds for every unit: one render for a burst of them.
  schedule() {
    this.timer ??= setTimeout(() => {
      this.timer = null;
      this.render();
    }, RENDER_MS);
  }

  setFilter(text) {
    this.filter = text.trim().toLowerCase();
    this.render();
  }

  /// Marks the unit whose directives are open.
  select(unitId) {
    this.selected = unitId;
    for (const [id, item] of this.items) item.li.classList.toggle("selected", id === unitId);
  }

  /// The tree as plain data: root codes, and per court its children and units (sorted).
  model() {
    const courts = new Map(this.courts);
    // An older hub sends no courts: its own court (or the hub) stands alone.
    if (!courts.size) {
      const code = this.court || this.hubId || "hub";
      courts.set(code, { code, name: this.court ? "" : `hub ${this.hubId}`, parent: "" });
    }
    const own = courts.has(this.court) ? this.court : null;
    // A unit of a court the tree does not name (yet) gets a node of its own under the root;
    // one without a court is on this hub, the root's.
    const unitsOf = new Map();
    for (const u of this.units.values()) {
      let code = u.court || own || [...courts.keys()][0];
      if (!courts.has(code)) {
        courts.set(code, { code, name: "", parent: own ?? "", unlisted: true });
      }
      if (!unitsOf.has(code)) unitsOf.set(code, []);
      unitsOf.get(code).push(u);
    }
    const children = new Map();
    const roots = [];
    for (const c of courts.values()) {
      // The user's court is the root even if it names a parent (the tree above is not ours).
      if (c.code !== own && c.parent && courts.has(c.parent) && c.parent !== c.code) {
        if (!children.has(c.parent)) children.set(c.parent, []);
        children.get(c.parent).push(c.code);
      } else {
        roots.push(c.code);
      }
    }
    roots.sort((a, b) => (a === own ? -1 : b === own ? 1 : byCode(a, b)));
    for (const list of children.values()) list.sort(byCode);
    for (const list of unitsOf.values()) list.sort((a, b) => byCode(a.unitId, b.unitId));
    return { courts, roots, children, unitsOf };
  }

  render() {
    clearTimeout(this.timer);
    this.timer = null;
    this.renders += 1;
    const m = this.model();
    const f = this.filter;
    const seen = new Set();
    const shownUnits = new Set();
    // Returns the court's <li> if it or anything below it matches the filter, else null.
    const build = (code, depth, path) => {
      if (path.has(code)) return null;
      path.add(code);
      const c = m.courts.get(code);
      const node = this.node(code);
      seen.add(code);
      const kids = (m.children.get(code) ?? []).map((k) => build(k, depth + 1, path)).filter(Boolean);
      const all = m.unitsOf.get(code) ?? [];
      const courtHit = !f || `${c.code} ${c.name ?? ""}`.toLowerCase().includes(f);
      const units = all.filter((u) => courtHit || u.unitId.toLowerCase().includes(f));
      path.delete(code);
      if (f && !units.length && !kids.length && !courtHit) return null;
      this.fillCourt(node, c, depth, this.tally(code, m));
      place(node.units, units.map((u) => {
        shownUnits.add(u.unitId);
        return this.fillUnit(u);
      }));
      place(node.children, kids);
      node.units.hidden = !units.length;
      node.children.hidden = !kids.length;
      node.empty.hidden = Boolean(units.length || kids.length);
      // A filter opens the courts it matches inside; otherwise the user's choice stands.
      node.details.open = f ? true : !this.collapsed.has(code);
      return node.li;
    };
    place(this.root, m.roots.map((code) => build(code, 0, new Set())).filter(Boolean));
    for (const [code, node] of this.nodes) {
      if (!seen.has(code)) {
        node.li.remove();
        this.nodes.delete(code);
      }
    }
    for (const [id, item] of this.items) {
      if (!this.units.has(id)) {
        item.li.remove();
        this.items.delete(id);
      }
    }
    const online = [...this.units.values()].filter((u) => u.online).length;
    this.count.textContent = `${m.courts.size} · ${online}/${this.units.size}`;
    this.lastModel = m;
    this.shown = shownUnits;
  }

  /// Units online and in all in a court and every court below it.
  tally(code, m, path = new Set()) {
    if (path.has(code)) return { online: 0, total: 0 };
    path.add(code);
    const own = m.unitsOf.get(code) ?? [];
    const t = { online: own.filter((u) => u.online).length, total: own.length };
    for (const k of m.children.get(code) ?? []) {
      const s = this.tally(k, m, path);
      t.online += s.online;
      t.total += s.total;
    }
    return t;
  }

  node(code) {
    let node = this.nodes.get(code);
    if (node) return node;
    const li = el("li", "court");
    li.dataset.court = code;
    const details = el("details");
    const summary = el("summary");
    const name = el("span", "c-name");
    const codeEl = el("span", "c-code");
    const tier = el("span", "tier");
    const count = el("span", "c-count");
    const meta = el("span", "c-meta");
    meta.append(codeEl, tier);
    summary.append(name, count, meta);
    const units = el("ul", "c-units");
    const children = el("ul", "c-children");
    const empty = el("p", "c-empty muted", "no units");
    details.append(summary, units, empty, children);
    li.append(details);
    details.addEventListener("toggle", () => {
      if (this.filter) return;
      if (details.open) this.collapsed.delete(code);
      else this.collapsed.add(code);
    });
    node = { li, details, summary, name, code: codeEl, tier, count, units, children, empty };
    this.nodes.set(code, node);
    return node;
  }

  fillCourt(node, c, depth, t) {
    const tier = TIERS[c.tier] ?? "";
    node.li.classList.toggle("own", c.code === this.court);
    node.li.classList.toggle("unlisted", Boolean(c.unlisted));
    node.li.dataset.tier = tier;
    node.li.dataset.depth = String(depth);
    node.name.textContent = c.name || c.code;
    node.name.title = c.name ? `${c.name} (${c.code})` : c.code;
    node.code.textContent = c.name ? c.code : "";
    node.tier.textContent = tier || (c.unlisted ? "not in tree" : "");
    node.tier.hidden = !node.tier.textContent;
    node.count.textContent = `${t.online}/${t.total}`;
    node.count.title = `${t.online} of ${t.total} units online, courts below included`;
    node.summary.setAttribute("aria-label", `${c.name || c.code}${c.name ? ` (${c.code})` : ""}`
      + `${tier ? `, ${tier} court` : ""}, ${t.online} of ${t.total} units online`);
  }

  fillUnit(u) {
    let item = this.items.get(u.unitId);
    if (!item) {
      const li = el("li", "unit");
      li.dataset.unit = u.unitId;
      li.draggable = true;
      const watch = el("button", "watch");
      const dot = el("span", "dot");
      const id = el("span", "id", u.unitId);
      const rate = el("span", "rate");
      watch.append(dot, id, rate);
      const direct = el("button", "direct", "⚑");
      direct.title = `Directives for ${u.unitId} (d)`;
      direct.setAttribute("aria-label", `Directives for ${u.unitId}`);
      li.append(watch, direct);
      li.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", u.unitId));
      watch.onclick = () => this.onWatch(u.unitId);
      direct.onclick = () => this.onDirect(u.unitId);
      item = { li, watch, rate };
      this.items.set(u.unitId, item);
    }
    item.li.className = `unit ${u.online ? "online" : "offline"}`;
    item.li.classList.toggle("selected", u.unitId === this.selected);
    item.rate.textContent = u.online && u.stats ? fmtRate(Number(u.stats.bitrateBps)) : "";
    item.watch.title = `Watch ${u.unitId} on the wall`;
    item.watch.setAttribute("aria-label",
      `Watch ${u.unitId}, ${u.online ? "online" : "offline"}`);
    return item.li;
  }

  /// Keyboard: the first unit (or court) of the tree.
  focus() {
    (this.root.querySelector("li.unit .watch") ?? this.root.querySelector("summary"))?.focus();
  }

  /// Plain data for tests: each court in tree order with its depth, tier and units.
  state() {
    const m = this.lastModel ?? this.model();
    const out = [];
    const walk = (code, depth, path) => {
      if (path.has(code)) return;
      path.add(code);
      const c = m.courts.get(code);
      out.push({
        code, name: c.name ?? "", tier: TIERS[c.tier] ?? "", parent: c.parent ?? "", depth,
        unlisted: Boolean(c.unlisted),
        units: (m.unitsOf.get(code) ?? []).map((u) => ({ unitId: u.unitId, online: u.online })),
      });
      for (const k of m.children.get(code) ?? []) walk(k, depth + 1, path);
    };
    for (const r of m.roots) walk(r, 0, new Set());
    return { court: this.court, roots: [...m.roots], courts: out, renders: this.renders };
  }
}
