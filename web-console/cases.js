// The Cases view: the hub's cases, one case's operations, a timeline of each unit's recorded
// segments (gaps marked), and playback of a recording with seeking (player.js). Data comes
// from /api/cases and /api/recordings in the protobuf JSON mapping (64-bit fields as strings).
import { HubError, Player, hubFetch } from "./player.js";

// Segments closer than this are drawn as one run (the recorder cuts them back to back).
const JOIN_US = 100_000;
const STEP_US = 5_000_000;

const pad = (n) => String(n).padStart(2, "0");

/// Local wall-clock time of `us` (µs since the epoch).
export function fmtTime(us, date = true) {
  const d = new Date(Number(us) / 1000);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return date ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}` : time;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const byUnit = (a, b) => a.localeCompare(b, undefined, { numeric: true });

function describe(e) {
  if (!(e instanceof HubError)) return e.message;
  if (e.status === 401) return `${e.message} (sign in again)`;
  if (e.status === 409) return `damaged: ${e.message}`;
  return `${e.status}: ${e.message}`;
}

export class Cases {
  constructor(token, root) {
    this.token = token;
    this.root = root;
    this.q = (sel) => root.querySelector(sel);
    this.video = this.q("#playback");
    this.cases = [];
    this.current = null;
    this.recordings = [];
    this.gaps = [];
    this.span = null;
    this.rows = new Map();
    this.player = null;
    this.errors = [];
    this.q("#cases-refresh").onclick = () => this.load().catch(() => {});
    this.q("#recordings-refresh").onclick = () => this.refresh().catch(() => {});
  }

  async api(path) {
    return (await hubFetch(path, this.token)).json();
  }

  showError(message, cls = "") {
    this.errors.push(message);
    // Beside the case when one is open, else under the list.
    const box = this.q(this.q("#case-body").hidden ? "#cases-error" : "#case-error");
    box.textContent = message;
    box.className = `error ${cls}`.trim();
  }

  /// Clears the messages; a damaged-file warning stays while its recording is playing.
  clearError(keepDamage = false) {
    this.q("#cases-error").textContent = "";
    const box = this.q("#case-error");
    if (keepDamage && box.classList.contains("damaged")) return;
    box.textContent = "";
    box.className = "error";
  }

  /// Lists the cases, in the hub's order.
  async load() {
    this.q("#cases-error").textContent = "";
    try {
      this.cases = (await this.api("/api/cases")).cases ?? [];
    } catch (e) {
      this.showError(`cases: ${describe(e)}`);
      throw e;
    }
    this.renderList();
    return this.cases.map((c) => c.number);
  }

  /// Keyboard focus into the view: the open case, or the first one.
  focusList() {
    const list = this.q("#case-list");
    (list.querySelector('[aria-current="true"]') ?? list.querySelector("button"))?.focus();
  }

  renderList() {
    const list = this.q("#case-list");
    this.q("#case-count").textContent = String(this.cases.length);
    list.replaceChildren(...this.cases.map((c) => {
      const b = el("button", "case");
      b.dataset.number = c.number;
      b.append(el("span", "number", c.number),
        el("span", `badge ${c.state === "open" ? "ok" : ""}`, c.state || "?"),
        el("span", "court muted", c.court || ""));
      if (this.current?.number === c.number) b.setAttribute("aria-current", "true");
      b.onclick = () => this.open(c.number).catch(() => {});
      const li = el("li");
      li.append(b);
      return li;
    }));
    if (!this.cases.length) list.append(el("li", "muted", "No cases."));
  }

  /// Opens a case: its operations and the timeline of each unit's recordings.
  async open(number) {
    this.clearError(true);
    const n = encodeURIComponent(number);
    let c;
    let listing;
    try {
      [c, listing] = await Promise.all([this.api(`/api/cases/${n}`),
        this.api(`/api/recordings?case=${n}`)]);
    } catch (e) {
      this.showError(`case ${number}: ${describe(e)}`);
      throw e;
    }
    if (this.current?.number !== number) {
      this.stop();
      this.clearError();
    }
    this.current = c;
    this.recordings = listing.recordings ?? [];
    this.gaps = (listing.gaps ?? []).map((g) =>
      ({ unit: g.unit, startUs: Number(g.startUs ?? 0), endUs: Number(g.endUs ?? 0) }));
    this.renderList();
    this.renderCase();
    const p = this.player;
    const rec = p && this.recordings.find((r) => r.unit === p.unit && r.recording === p.recording);
    if (rec) {
      // Same case again: the playing recording carries on with the longer listing.
      p.update(rec);
      this.rows.get(p.unit)?.row.classList.add("playing");
      for (const s of p.segments.filter((x) => p.bad.has(x.number))) {
        this.rows.get(p.unit)?.bar.append(this.block("tl-bad", s.startUs, s.endUs,
          `segment ${s.number}: ${p.bad.get(s.number)}`));
      }
      this.showPlayhead();
    } else if (p) {
      this.stop();
    }
    return this.state();
  }

  /// Lists the open case's recordings again (a case still being recorded grows).
  async refresh() {
    if (this.current) await this.open(this.current.number);
  }

  renderCase() {
    const c = this.current;
    this.q("#case-empty").hidden = true;
    this.q("#case-body").hidden = false;
    this.q("#case-title").textContent = c.number;
    const state = this.q("#case-state");
    state.textContent = c.state || "?";
    state.className = `badge ${c.state === "open" ? "ok" : ""}`;
    const meta = [c.court, ...(c.parties ?? [])].filter(Boolean);
    meta.push(`opened ${fmtTime(c.createdUs ?? 0)}`);
    if (Number(c.closedUs ?? 0)) meta.push(`closed ${fmtTime(c.closedUs)}`);
    this.q("#case-meta").textContent = meta.join(" · ");

    const ops = c.operations ?? [];
    this.q("#operations tbody").replaceChildren(...ops.map((o) => {
      const tr = el("tr");
      const at = `${(o.latitude ?? 0).toFixed(4)}, ${(o.longitude ?? 0).toFixed(4)}`;
      const where = o.radiusM ? `${at} ±${Math.round(o.radiusM)} m` : "";
      for (const text of [`${o.name || ""} (${o.id})`,
        `${fmtTime(o.startsUs ?? 0)} – ${fmtTime(o.endsUs ?? 0)}`,
        (o.units ?? []).join(", "), where, o.state || ""]) tr.append(el("td", "", text));
      return tr;
    }));
    this.q("#operations").hidden = !ops.length;
    this.q("#no-operations").hidden = ops.length > 0;
    this.renderTimelines();
  }

  renderTimelines() {
    const units = new Set(this.recordings.map((r) => r.unit));
    for (const o of this.current.operations ?? []) for (const u of o.units ?? []) units.add(u);
    for (const g of this.gaps) units.add(g.unit);
    // One time axis for every unit: from the first recorded moment to the last.
    let from = Infinity;
    let to = -Infinity;
    for (const r of this.recordings) {
      for (const s of r.segments ?? []) {
        from = Math.min(from, Number(s.startUs));
        to = Math.max(to, Number(s.endUs));
      }
    }
    for (const g of this.gaps) {
      from = Math.min(from, g.startUs);
      to = Math.max(to, g.endUs);
    }
    this.span = from < to ? { startUs: from, endUs: to } : null;
    const root = this.q("#timelines");
    this.rows.clear();
    if (!this.span) {
      root.replaceChildren(el("p", "muted", "Nothing recorded for this case yet."));
      return;
    }
    const axis = el("div", "tl-axis");
    for (let i = 0; i <= 4; i++) {
      const tick = el("span", "tl-tick", fmtTime(from + ((to - from) * i) / 4, i === 0));
      tick.style.left = `${i * 25}%`;
      axis.append(tick);
    }
    const head = el("div", "tl-row");
    head.append(el("span"), axis);
    root.replaceChildren(head, ...[...units].sort(byUnit).map((u) => this.renderRow(u)));
  }

  /// Left offset, in percent of the bar, of wall-clock time `us`.
  pct(us) {
    const { startUs, endUs } = this.span;
    return (100 * (us - startUs)) / (endUs - startUs);
  }

  renderRow(unit) {
    const recs = this.recordings.filter((r) => r.unit === unit);
    const row = el("div", "tl-row");
    row.dataset.unit = unit;
    const label = el("div", "tl-label");
    const play = el("button", "play", `▶ ${unit}`);
    play.title = `Play ${unit}'s recording`;
    play.disabled = !recs.length;
    play.onclick = () => this.play(unit).catch(() => {});
    label.append(play);
    const officer = recs.find((r) => r.officer)?.officer;
    if (officer) label.append(el("span", "muted", officer));
    const bar = el("div", "tl-bar");
    bar.tabIndex = 0;
    bar.setAttribute("role", "slider");
    bar.setAttribute("aria-label", `${unit}: recorded time; arrows seek 5 s, Enter plays`);
    bar.setAttribute("aria-valuemin", "0");
    const seconds = (this.span.endUs - this.span.startUs) / 1e6;
    bar.setAttribute("aria-valuemax", String(Math.round(seconds)));
    for (const r of recs) {
      let run = null;
      const flush = () => run && bar.append(this.block("tl-seg", run.startUs, run.endUs,
        `${unit} ${fmtTime(run.startUs)} – ${fmtTime(run.endUs, false)} (${run.n} segments)`));
      for (const s of r.segments ?? []) {
        const a = Number(s.startUs);
        const b = Number(s.endUs);
        if (run && a - run.endUs <= JOIN_US) {
          run.endUs = b;
          run.n += 1;
        } else {
          flush();
          run = { startUs: a, endUs: b, n: 1 };
        }
      }
      flush();
    }
    for (const g of this.gaps.filter((x) => x.unit === unit)) {
      bar.append(this.block("tl-gap", g.startUs, g.endUs,
        `gap: nothing recorded ${fmtTime(g.startUs)} – ${fmtTime(g.endUs, false)}`));
    }
    if (!recs.length) bar.append(el("span", "tl-none", "nothing recorded"));
    const head = el("div", "tl-head");
    head.hidden = true;
    bar.append(head);
    bar.addEventListener("click", (e) => {
      const box = bar.getBoundingClientRect();
      const f = Math.min(1, Math.max(0, (e.clientX - box.left) / box.width));
      const us = this.span.startUs + f * (this.span.endUs - this.span.startUs);
      this.play(unit, { atUs: us }).catch(() => {});
    });
    bar.addEventListener("keydown", (e) => this.onBarKey(unit, e));
    row.append(label, bar);
    this.rows.set(unit, { row, bar, head });
    return row;
  }

  block(cls, startUs, endUs, title) {
    const b = el("div", cls);
    const left = Math.max(0, this.pct(startUs));
    b.style.left = `${left}%`;
    // At least a sliver, so a short gap or a damaged segment stays visible.
    b.style.width = `max(2px, ${Math.min(100, this.pct(endUs)) - left}%)`;
    b.title = title;
    return b;
  }

  onBarKey(unit, e) {
    const mine = this.player?.unit === unit;
    const now = mine ? this.player.wallAt(this.video.currentTime) : null;
    let target = null;
    if (e.key === "ArrowRight") target = (now ?? this.span.startUs) + STEP_US;
    else if (e.key === "ArrowLeft") target = (now ?? this.span.startUs) - STEP_US;
    else if (e.key === "Home") target = this.span.startUs;
    else if (e.key === "End") target = this.span.endUs - STEP_US;
    else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      if (!mine) this.play(unit).catch(() => {});
      else if (this.video.paused) this.video.play().catch(() => {});
      else this.video.pause();
      return;
    } else return;
    e.preventDefault();
    target = Math.min(Math.max(target, this.span.startUs), this.span.endUs - 1);
    this.play(unit, { atUs: target }).catch(() => {});
  }

  /// Plays `unit`'s recording from its start, or from wall-clock time `atUs` (µs). Within a
  /// recording already playing this is a seek.
  async play(unit, { atUs = null, recording = null } = {}) {
    this.clearError(true);
    const recs = this.recordings.filter((r) => r.unit === unit);
    const covers = (r, us) =>
      (r.segments ?? []).some((s) => Number(s.startUs) <= us && us < Number(s.endUs));
    let rec = recording ? recs.find((r) => r.recording === recording) : null;
    if (!rec && atUs != null) {
      rec = recs.find((r) => covers(r, atUs));
      if (!rec) {
        // In a gap: go on to the next recorded moment.
        const next = recs
          .flatMap((r) => (r.segments ?? []).map((s) => ({ r, us: Number(s.startUs) })))
          .filter((x) => x.us > atUs)
          .sort((a, b) => a.us - b.us)[0];
        if (!next) {
          this.showError(`${unit}: nothing recorded at or after ${fmtTime(atUs)}`);
          return this.state();
        }
        rec = next.r;
        atUs = next.us;
      }
    }
    rec ??= recs[0];
    if (!rec) {
      this.showError(`${unit}: no recording in this case`);
      throw new Error(`no recording of ${unit}`);
    }
    const p = this.player;
    if (p && !p.closed && p.unit === unit && p.recording === rec.recording) {
      if (atUs != null) p.seekWall(atUs);
      this.video.play().catch(() => {});
      return this.state();
    }
    this.stop();
    this.clearError();
    const player = new Player(this.video, rec, this.token);
    this.player = player;
    player.addEventListener("time", () => this.showPlayhead());
    player.addEventListener("change", () => this.showPlayhead());
    player.addEventListener("error", (e) =>
      this.showError(`${unit}: ${e.detail.source}: ${e.detail.message}`));
    player.addEventListener("bad", (e) => this.onBad(unit, e.detail));
    this.q("#player").hidden = false;
    for (const [u, r] of this.rows) r.row.classList.toggle("playing", u === unit);
    try {
      await player.start(atUs);
    } catch (e) {
      // Replaced by another recording meanwhile: not an error.
      if (player.closed) return this.state();
      player.fail("start", describe(e));
      throw e;
    }
    if (player.closed) return this.state();
    this.video.play().catch(() => this.showInfo("press play to start"));
    this.showPlayhead();
    return this.state();
  }

  /// Seeks the recording playing to wall-clock time `us` (or another recording of its unit).
  async seek(us) {
    if (!this.player) throw new Error("nothing is playing");
    return this.play(this.player.unit, { atUs: us });
  }

  onBad(unit, bad) {
    const when = `${fmtTime(bad.startUs)} – ${fmtTime(bad.endUs, false)}`;
    if (bad.status === 409) {
      this.showError(`${unit}, segment ${bad.number} (${when}) is DAMAGED: it differs from its `
        + "signed hash, so the hub refused to serve it (audited). Playback skips it.", "damaged");
    } else {
      this.showError(`${unit}, segment ${bad.number} (${when}): ${bad.reason}. Playback skips it.`);
    }
    this.rows.get(unit)?.bar.append(this.block("tl-bad", bad.startUs, bad.endUs,
      `segment ${bad.number}: ${bad.reason}`));
  }

  stop() {
    this.player?.close();
    this.player = null;
    for (const r of this.rows.values()) {
      r.row.classList.remove("playing");
      r.head.hidden = true;
    }
  }

  showInfo(text) {
    this.q("#playback-info").textContent = text;
  }

  showPlayhead() {
    const p = this.player;
    if (!p) return;
    const us = p.wallAt(this.video.currentTime);
    const row = this.rows.get(p.unit);
    if (row && us != null && this.span) {
      row.head.hidden = false;
      row.head.style.left = `${this.pct(us)}%`;
      row.bar.setAttribute("aria-valuenow", String(Math.round((us - this.span.startUs) / 1e6)));
      row.bar.setAttribute("aria-valuetext", fmtTime(us));
    }
    const i = p.indexAt(this.video.currentTime);
    const parts = [p.unit, `recording ${p.recording}`, us != null ? fmtTime(us) : "—",
      i >= 0 ? `segment ${p.segments[i].number} (${i + 1}/${p.segments.length})` : ""];
    if (p.verified) parts.push(`${p.verified} hash-checked here`);
    this.showInfo(parts.filter(Boolean).join(" · "));
  }

  /// Plain data for tests.
  state() {
    return {
      cases: this.cases.map((c) => c.number),
      caseNumber: this.current?.number ?? null,
      units: [...this.rows.keys()],
      span: this.span,
      errors: [...this.errors],
      player: this.player?.state() ?? null,
    };
  }
}
