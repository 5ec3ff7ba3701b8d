// The video wall and the unit list. Tiles are slots of the grid; each shows one unit through
// the session's one PeerConnection (the hub adds and removes transceivers per tile).

const MAX_SLOTS = 16;
const LAYOUTS = [1, 4, 9, 16];

const fmtRate = (bps) =>
  bps >= 1e6 ? `${(bps / 1e6).toFixed(1)} Mb/s` : `${Math.round((bps || 0) / 1e3)} kb/s`;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export class Wall {
  constructor(session, root, unitList) {
    this.session = session;
    this.root = root;
    this.unitList = unitList;
    this.units = new Map();
    this.slots = [];
    this.generation = 0;
    this.filter = "";
    // Set by the app: opens the directives of a unit (the ⚑ in a tile's header).
    this.onDirect = () => {};
    for (let i = 0; i < MAX_SLOTS; i++) this.slots.push(this.makeSlot(i));
    this.setLayout(Number(root.dataset.layout) || 4);
    session.addEventListener("tile", (e) => this.onTile(e.detail));
    session.addEventListener("stats", (e) => this.onStats(e.detail));
    session.addEventListener("negotiated", () => this.attachAll());
    session.addEventListener("track", (e) => {
      const slot = this.slotOf(e.detail.tileId);
      if (slot && slot.status !== "pending") this.attach(slot);
    });
    setInterval(() => this.sampleReceivers(), 2000);
  }

  makeSlot(index) {
    const tile = el("div", "tile");
    tile.dataset.slot = index;
    const video = el("video");
    video.autoplay = true;
    video.muted = true;
    video.playsInline = true;
    const empty = el("div", "empty", "drop a unit here");
    const overlay = el("div", "overlay");
    const name = el("span", "name");
    const state = el("span", "state");
    const rate = el("span", "rate");
    const fps = el("span", "fps");
    const delay = el("span", "delay");
    // The header's one control: the directives of the tile's unit.
    const direct = el("button", "direct", "⚑");
    direct.hidden = true;
    direct.onclick = (e) => {
      e.stopPropagation();
      if (slot.unitId) this.onDirect(slot.unitId);
    };
    direct.addEventListener("dblclick", (e) => e.stopPropagation());
    overlay.append(name, state, direct, el("span", "spacer"), rate, fps, delay);
    const close = el("button", "close", "×");
    close.title = "Clear this tile";
    close.onclick = (e) => {
      e.stopPropagation();
      this.clear(index);
    };
    tile.append(video, empty, overlay, close);
    overlay.hidden = true;
    close.hidden = true;
    tile.addEventListener("dragover", (e) => {
      e.preventDefault();
      tile.classList.add("drop");
    });
    tile.addEventListener("dragleave", () => tile.classList.remove("drop"));
    tile.addEventListener("drop", (e) => {
      e.preventDefault();
      tile.classList.remove("drop");
      const unit = e.dataTransfer.getData("text/plain");
      if (unit) this.assign(index, unit);
    });
    tile.addEventListener("dblclick", () => this.toggleEnlarge(index));
    this.root.append(tile);
    const slot = { index, tile, video, empty, overlay, close, direct, name, state, rate, fps,
      delay, tileId: null, unitId: null, status: "empty", hubDelayMs: null, bufferMs: null };
    return slot;
  }

  setLayout(n) {
    this.layout = n;
    this.root.dataset.layout = String(n);
    this.root.classList.remove("enlarged");
    this.slots.forEach((s, i) => {
      s.tile.hidden = i >= n;
      s.tile.classList.remove("big");
      if (i >= n && s.tileId) this.clear(i);
    });
    document.querySelectorAll("#layouts button").forEach((b) =>
      b.classList.toggle("active", Number(b.dataset.layout) === n));
  }

  toggleEnlarge(index) {
    const slot = this.slots[index];
    const big = !slot.tile.classList.contains("big");
    this.slots.forEach((s) => {
      s.tile.classList.remove("big");
      s.video.muted = true;
    });
    this.root.classList.toggle("enlarged", big);
    if (big) {
      slot.tile.classList.add("big");
      // The enlarged tile is the one you listen to.
      slot.video.muted = false;
    }
  }

  /// The unit of the enlarged tile, if one is enlarged.
  enlargedUnit() {
    return this.slots.find((s) => s.tile.classList.contains("big"))?.unitId ?? null;
  }

  unenlarge() {
    this.root.classList.remove("enlarged");
    this.slots.forEach((s) => {
      s.tile.classList.remove("big");
      s.video.muted = true;
    });
  }

  /// Shows `unitId` on the slot, replacing what was there.
  assign(index, unitId) {
    const slot = this.slots[index];
    if (slot.tileId) this.session.removeTile(slot.tileId);
    this.generation += 1;
    slot.tileId = `s${index}-${this.generation}`;
    slot.unitId = unitId;
    slot.video.srcObject = null;
    this.setStatus(slot, "pending");
    slot.name.textContent = unitId;
    slot.empty.hidden = true;
    slot.overlay.hidden = false;
    slot.close.hidden = false;
    slot.direct.hidden = false;
    slot.direct.title = `Directives for ${unitId} (d)`;
    slot.direct.setAttribute("aria-label", `Directives for ${unitId}`);
    this.session.addTile(slot.tileId, unitId);
  }

  /// Puts `unitId` on the wall from elsewhere (the map): the tile already showing it, else
  /// the next free tile, else a larger layout, else the last tile. Returns the slot index.
  watch(unitId) {
    // A tile the hub refused keeps its unit but no tile id: that one is tried again.
    let slot = this.slots.slice(0, this.layout).find((s) => s.unitId === unitId && s.tileId);
    if (!slot) {
      // Growing the wall keeps what others are watching; only a full 4×4 gives up a tile.
      if (!this.freeSlot() && this.layout < MAX_SLOTS) {
        this.setLayout(LAYOUTS.find((n) => n > this.layout));
      }
      slot = this.freeSlot() ?? this.slots[this.layout - 1];
      this.assign(slot.index, unitId);
    }
    // A flash shows where it landed; the reflow restarts the animation on the same tile.
    slot.tile.classList.remove("flash");
    void slot.tile.offsetWidth;
    slot.tile.classList.add("flash");
    return slot.index;
  }

  /// The next visible empty slot, or null.
  freeSlot() {
    return this.slots.slice(0, this.layout).find((s) => !s.tileId) ?? null;
  }

  clear(index) {
    const slot = this.slots[index];
    if (slot.tileId) this.session.removeTile(slot.tileId);
    slot.tileId = null;
    slot.unitId = null;
    slot.video.srcObject = null;
    slot.empty.hidden = false;
    slot.overlay.hidden = true;
    slot.close.hidden = true;
    slot.direct.hidden = true;
    this.setStatus(slot, "empty");
  }

  setStatus(slot, status) {
    slot.status = status;
    slot.state.textContent = status;
    slot.state.className = `state ${status}`;
    slot.tile.dataset.status = status;
  }

  slotOf(tileId) {
    return this.slots.find((s) => s.tileId === tileId) ?? null;
  }

  onTile(t) {
    const slot = this.slotOf(t.tileId);
    if (!slot) return;
    slot.videoMid = t.videoMid;
    slot.audioMid = t.audioMid;
    if (t.state === "STATE_LIVE") {
      this.setStatus(slot, this.units.get(slot.unitId)?.online === false ? "offline" : "live");
      this.attach(slot);
    } else if (t.state === "STATE_REMOVED") {
      // Refused (unknown unit, too many tiles): the reason is in the error event.
      slot.tileId = null;
      this.setStatus(slot, "error");
      slot.state.title = t.reason;
    }
  }

  attach(slot) {
    const stream = this.session.streamFor(slot.tileId);
    if (!stream || slot.video.srcObject === stream) return;
    slot.video.srcObject = stream;
    slot.video.play().catch(() => {});
  }

  attachAll() {
    for (const s of this.slots) if (s.tileId && s.status !== "pending") this.attach(s);
  }

  onStats(st) {
    const slot = this.slotOf(st.tileId);
    if (!slot) return;
    slot.rate.textContent = fmtRate(Number(st.bitrateBps));
    slot.fps.textContent = `${Math.round(st.framerate || 0)} fps`;
    slot.hubDelayMs = Number(st.delayUs || 0) / 1000;
    this.showDelay(slot);
    const online = this.units.get(slot.unitId)?.online !== false;
    if (slot.status !== "pending" && slot.status !== "error") {
      this.setStatus(slot, !online ? "offline" : st.stalled ? "stalled" : "live");
    }
  }

  showDelay(slot) {
    if (slot.hubDelayMs == null) return;
    // Capture → hub send (from the hub) plus this browser's jitter buffer: an estimate.
    const total = slot.hubDelayMs + (slot.bufferMs ?? 0);
    slot.delay.textContent = `~${Math.round(total)} ms`;
  }

  async sampleReceivers() {
    const pc = this.session.pc;
    if (!pc) return;
    const stats = await pc.getStats();
    for (const slot of this.slots) {
      const track = slot.tileId ? this.session.streamFor(slot.tileId)?.getVideoTracks()[0] : null;
      if (!track) continue;
      stats.forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "video" && r.trackIdentifier === track.id
            && r.jitterBufferEmittedCount) {
          slot.bufferMs = (r.jitterBufferDelay / r.jitterBufferEmittedCount) * 1000;
          slot.framesDecoded = r.framesDecoded;
        }
      });
      this.showDelay(slot);
    }
  }

  setUnits(units) {
    this.units.clear();
    for (const u of units) this.units.set(u.unitId, u);
    this.renderUnits();
  }

  updateUnit(u) {
    const known = this.units.get(u.unitId) ?? {};
    // Change events carry no stats: keep the last known ones.
    const online = Boolean(u.online);
    this.units.set(u.unitId, { ...known, ...u, stats: u.stats ?? known.stats, online });
    if (known.online !== online) {
      for (const s of this.slots) {
        if (s.unitId === u.unitId && s.status !== "pending" && s.status !== "error") {
          this.setStatus(s, online ? "live" : "offline");
        }
      }
    }
    this.renderUnits();
  }

  renderUnits() {
    const list = [...this.units.values()]
      .filter((u) => u.unitId.toLowerCase().includes(this.filter))
      .sort((a, b) => a.unitId.localeCompare(b.unitId, undefined, { numeric: true }));
    this.unitList.replaceChildren(
      ...list.map((u) => {
        const li = el("li", u.online ? "online" : "offline");
        li.draggable = true;
        li.dataset.unit = u.unitId;
        li.append(el("span", "dot"), el("span", "id", u.unitId),
          el("span", "rate", u.stats ? fmtRate(Number(u.stats.bitrateBps)) : ""));
        li.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", u.unitId));
        li.addEventListener("click", () => {
          const free = this.freeSlot();
          if (free) this.assign(free.index, u.unitId);
        });
        return li;
      }),
    );
    document.getElementById("unit-count").textContent =
      `${[...this.units.values()].filter((u) => u.online).length}/${this.units.size}`;
  }
}
