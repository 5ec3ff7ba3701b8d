// The directives panel: orders to one unit (go live, stop live, keyframe, snapshot, marks,
// quality, a free-text instruction) over the console session, and the recent directives with
// their states as the hub reports them (sent, delivered, acknowledged, done, failed). The
// hub answers every directive it accepts with its SENT state and refuses the others with a
// session error; the panel ties that error to the request it answers.
import { fmtTime } from "./cases.js";

export const KINDS = {
  DIRECTIVE_KIND_GO_LIVE: "go live",
  DIRECTIVE_KIND_STOP_LIVE: "stop live",
  DIRECTIVE_KIND_QUALITY: "quality",
  DIRECTIVE_KIND_KEYFRAME: "keyframe",
  DIRECTIVE_KIND_SNAPSHOT: "snapshot",
  DIRECTIVE_KIND_MARK: "mark",
  DIRECTIVE_KIND_MESSAGE: "instruction",
};
// States only move forward; DONE and FAILED are final.
const STATES = {
  DIRECTIVE_STATE_SENT: ["sent", 1],
  DIRECTIVE_STATE_DELIVERED: ["delivered", 2],
  DIRECTIVE_STATE_ACKNOWLEDGED: ["acknowledged", 3],
  DIRECTIVE_STATE_DONE: ["done", 4],
  DIRECTIVE_STATE_FAILED: ["failed", 4],
};
const stateName = (s) => STATES[s]?.[0] ?? "unknown";
const rank = (s) => STATES[s]?.[1] ?? 0;
const FINAL = new Set(["done", "failed", "refused", "unanswered"]);
// The hub answers at once (an index write); no answer in this long is reported.
const ANSWER_MS = 10000;
const KEPT = 200;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const today = (us) => new Date(Number(us) / 1000).toDateString() === new Date().toDateString();
const when = (us) => (Number(us) ? fmtTime(us, !today(us)) : "");

/// What a request asked for, in words: "50 kbit/s · 720 px", "“hold position”".
function detailOf(req) {
  if (req.kind === "DIRECTIVE_KIND_QUALITY") {
    return [req.bitrate && `${req.bitrate} kbit/s`, req.height && `${req.height} px`]
      .filter(Boolean).join(" · ");
  }
  return req.text ? `“${req.text}”` : "";
}

export class Directives extends EventTarget {
  constructor(session, root, { units = () => [], onSelect = () => {}, onLink = () => {} } = {}) {
    super();
    this.session = session;
    this.root = root;
    this.q = (sel) => root.querySelector(sel);
    this.units = units;
    this.onSelect = onSelect;
    // A video link went live (unit) or ended (null): the app fills the screen with it.
    this.onLink = onLink;
    this.linking = null;
    this.unitId = null;
    this.user = "";
    // directive id (or a local id while unanswered) → record, and the requests not yet
    // answered, oldest first.
    this.records = new Map();
    this.items = new Map();
    this.pending = [];
    this.localSeq = 0;
    this.errors = [];
    this.opener = null;

    // The unit list is the wall's, updated by its own listener: read it after that ran.
    session.addEventListener("ready", (e) => {
      this.user = e.detail.user ?? "";
      queueMicrotask(() => this.fillUnits());
    });
    session.addEventListener("unit", () => queueMicrotask(() => {
      if (!this.root.hidden) this.fillUnits();
    }));
    session.addEventListener("directive", (e) => this.onUpdate(e.detail));
    session.addEventListener("error", (e) => this.onError(e.detail));
    session.addEventListener("close", () => {
      for (const p of this.pending.splice(0)) this.settleLocal(p, "unanswered", "session closed");
    });

    this.q("#directives-close").onclick = () => this.close();
    this.q("#directive-unit").onchange = (e) => this.open(e.target.value, { focus: false });
    this.q("#directives-all").onchange = () => this.render();
    for (const b of root.querySelectorAll(".d-actions button[data-kind]")) {
      b.onclick = () => this.send({ kind: b.dataset.kind });
    }
    this.q("#directive-mark").onsubmit = (e) => {
      e.preventDefault();
      const action = e.submitter?.dataset.action ?? "start";
      const label = this.q("#mark-label").value.trim();
      if (!label) return this.complain("A mark needs a label.", "#mark-label");
      this.send({ kind: "DIRECTIVE_KIND_MARK", text: `${action} ${label}` });
    };
    this.q("#directive-quality").onsubmit = (e) => {
      e.preventDefault();
      const bitrate = Math.round(Number(this.q("#quality-bitrate").value) || 0);
      const height = Math.round(Number(this.q("#quality-height").value) || 0);
      if (bitrate <= 0 && height <= 0) {
        return this.complain("Quality needs a bitrate (kbit/s) or a height (px).", "#quality-bitrate");
      }
      // The unit decides what it can do (100–8000 kbit/s on the reference agent): a target
      // out of its range comes back FAILED with its reason.
      this.send({ kind: "DIRECTIVE_KIND_QUALITY", bitrate, height });
    };
    this.q("#directive-message").onsubmit = (e) => {
      e.preventDefault();
      const text = this.q("#message-text").value.trim();
      if (!text) return this.complain("Write the instruction first.", "#message-text");
      if (this.send({ kind: "DIRECTIVE_KIND_MESSAGE", text })) this.q("#message-text").value = "";
    };
    // Push-to-talk: held with the pointer, or Space/Enter held while the button has focus.
    const talk = this.q("#talk-button");
    this.talking = false;
    this.talkLog = [];
    const press = (e) => {
      e.preventDefault();
      if (!this.talking && this.unitId) this.talkStart();
    };
    const release = () => { if (this.talking) this.talkStop(); };
    talk.addEventListener("pointerdown", press);
    talk.addEventListener("pointerup", release);
    talk.addEventListener("pointerleave", release);
    talk.addEventListener("keydown", (e) => {
      if ((e.key === " " || e.key === "Enter") && !e.repeat) press(e);
    });
    talk.addEventListener("keyup", (e) => {
      if (e.key === " " || e.key === "Enter") release();
    });
    // A video link: a toggle, open until pressed again (or ended from the self view).
    this.q("#link-button").addEventListener("click", () => {
      if (this.linking) this.linkStop();
      else if (this.unitId && !this.talking) this.linkStart();
    });
    session.addEventListener("talk", (e) => this.onTalk(e.detail));
    root.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.stopPropagation();
        this.close();
      }
    });
  }

  async talkStart() {
    const unit = this.unitId;
    this.talking = true;
    this.q("#talk-button").setAttribute("aria-pressed", "true");
    this.q("#talk-state").textContent = `connecting to ${unit}…`;
    this.talkLog.push({ unit, at: Date.now(), state: "pressed" });
    if (!(await this.session.talkStart(unit))) this.talkStop();
  }

  talkStop() {
    this.talking = false;
    this.q("#talk-button").setAttribute("aria-pressed", "false");
    this.session.talkStop();
  }

  async linkStart() {
    const unit = this.unitId;
    this.linking = unit;
    this.q("#link-button").setAttribute("aria-pressed", "true");
    this.q("#talk-state").textContent = `opening a video link with ${unit}…`;
    this.talkLog.push({ unit, at: Date.now(), state: "pressed", video: true });
    if (!(await this.session.linkStart(unit))) this.linkStop();
  }

  linkStop() {
    const was = this.linking;
    this.linking = null;
    this.q("#link-button").setAttribute("aria-pressed", "false");
    this.q("#link-button").classList.remove("live");
    if (was) this.session.talkStop();
    this.onLink(null);
  }

  onTalk(t) {
    const state = (t.state ?? "").replace("STATE_", "").toLowerCase();
    const video = !!this.linking && t.unitId === this.linking;
    this.talkLog.push({ unit: t.unitId, at: Date.now(), state, reason: t.reason ?? "", video });
    const text = video ? {
      live: `video link with ${t.unitId}`,
      stopped: "",
      refused: `no video link with ${t.unitId}: ${t.reason}`,
    }[state] : {
      live: `talking to ${t.unitId}`,
      stopped: "",
      refused: `cannot talk to ${t.unitId}: ${t.reason}`,
    }[state];
    this.q("#talk-state").textContent = text ?? "";
    if (video) {
      this.q("#link-button").classList.toggle("live", state === "live");
      if (state === "live") this.onLink(t.unitId);
      else if (state === "refused" || state === "stopped") this.linkStop();
      return;
    }
    this.q("#talk-button").classList.toggle("live", state === "live");
    if (state === "refused") {
      this.talking = false;
      this.q("#talk-button").setAttribute("aria-pressed", "false");
    }
  }

  /// Opens the panel for `unitId` (the keyboard lands on its first button).
  open(unitId, { focus = true } = {}) {
    if (!unitId) return;
    if (focus && this.root.hidden) this.opener = document.activeElement;
    this.unitId = unitId;
    this.root.hidden = false;
    this.fillUnits();
    this.q("#directives-error").textContent = "";
    this.render();
    this.onSelect(unitId);
    if (focus) this.q(".d-actions button")?.focus();
  }

  close() {
    this.root.hidden = true;
    this.unitId = null;
    this.onSelect(null);
    const back = this.opener;
    this.opener = null;
    if (back?.isConnected && typeof back.focus === "function") back.focus();
  }

  /// The unit list of the select: every unit the session knows, the chosen one included.
  fillUnits() {
    const select = this.q("#directive-unit");
    const ids = [...new Set([...this.units().map((u) => u.unitId), this.unitId].filter(Boolean))]
      .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    if (select.options.length !== ids.length || ids.some((id, i) => select.options[i].value !== id)) {
      select.replaceChildren(...ids.map((id) => {
        const o = el("option", "", id);
        o.value = id;
        return o;
      }));
    }
    if (this.unitId) select.value = this.unitId;
    this.fillUnitInfo();
  }

  fillUnitInfo() {
    if (!this.unitId || this.root.hidden) return;
    const u = this.units().find((x) => x.unitId === this.unitId);
    const info = this.q("#directive-unit-info");
    if (!u) info.textContent = "unit not known here";
    else {
      info.textContent = [u.court && `court ${u.court}`,
        u.online ? "online" : "offline: the hub delivers when it is back"].filter(Boolean).join(" · ");
    }
  }

  complain(message, focusSel) {
    this.q("#directives-error").textContent = message;
    if (focusSel) this.q(focusSel)?.focus();
    return false;
  }

  /// Issues a directive to the open unit (or `req.unitId`). Returns false if it could not be
  /// sent; the hub's answer arrives as a directive update or a refusal.
  send(req) {
    const unitId = req.unitId ?? this.unitId;
    if (!unitId) return this.complain("Choose a unit first.");
    const request = { unitId, kind: req.kind };
    if (req.text) request.text = req.text;
    if (req.bitrate) request.bitrate = req.bitrate;
    if (req.height) request.height = req.height;
    const local = {
      id: `local-${++this.localSeq}`, local: true, unitId, kind: req.kind, state: "sending",
      reason: "", issuedBy: this.user, court: "", text: req.text ?? "",
      detail: detailOf(request), issuedAtUs: Date.now() * 1000, updatedAtUs: Date.now() * 1000,
    };
    if (!this.session.direct(request)) {
      return this.complain("Not connected to the hub: the directive was not sent.");
    }
    this.q("#directives-error").textContent = "";
    this.records.set(local.id, local);
    const p = { ...local, timer: null };
    p.timer = setTimeout(() => {
      const i = this.pending.indexOf(p);
      if (i >= 0) {
        this.pending.splice(i, 1);
        this.settleLocal(p, "unanswered", `no answer from the hub within ${ANSWER_MS / 1000} s`);
      }
    }, ANSWER_MS);
    this.pending.push(p);
    this.prune();
    this.render();
    return true;
  }

  settleLocal(p, state, reason) {
    clearTimeout(p.timer);
    const r = this.records.get(p.id);
    if (!r) return;
    r.state = state;
    r.reason = reason;
    r.updatedAtUs = Date.now() * 1000;
    this.announce(r);
    this.render();
  }

  onUpdate(u) {
    if (!u.directiveId) return;
    let r = this.records.get(u.directiveId);
    if (!r) {
      // Our own request's first answer takes the place of its local entry.
      const i = this.pending.findIndex((p) => p.unitId === u.unitId && p.kind === u.kind
        && (!u.issuedBy || !this.user || u.issuedBy === this.user));
      let detail = "";
      if (i >= 0) {
        const [p] = this.pending.splice(i, 1);
        clearTimeout(p.timer);
        this.records.delete(p.id);
        detail = p.detail;
      }
      r = { id: u.directiveId, detail, state: "", rankOf: 0 };
      this.records.set(u.directiveId, r);
    } else if (FINAL.has(r.state) || rank(u.state) < r.rankOf) {
      // Late or repeated reports of an older state change nothing.
      return;
    }
    const before = r.state;
    Object.assign(r, {
      unitId: u.unitId, kind: u.kind, reason: u.reason ?? "", issuedBy: u.issuedBy ?? "",
      court: u.court ?? "", text: u.text ?? "", issuedAtUs: u.issuedAtUs ?? 0,
      updatedAtUs: u.updatedAtUs ?? 0, state: stateName(u.state), rankOf: rank(u.state),
    });
    if (!r.detail) r.detail = detailOf({ kind: r.kind, text: r.text });
    if (r.state !== before && FINAL.has(r.state)) this.announce(r);
    this.prune();
    this.render();
    this.dispatchEvent(new CustomEvent("change", { detail: { ...r } }));
  }

  /// A session error with a code and no tile while a request waits is the hub's refusal of
  /// that request (a viewer's token, a unit outside the user's court, a bad request).
  onError(err) {
    if (err.tileId || !err.code || !this.pending.length) return;
    const p = this.pending.shift();
    this.errors.push({ unitId: p.unitId, kind: p.kind, code: err.code, message: err.message });
    this.settleLocal(p, "refused", err.message);
    const kind = KINDS[p.kind] ?? p.kind;
    this.q("#directives-error").textContent = `${kind} to ${p.unitId} refused: ${err.message}`;
  }

  /// Final states of this user's directives are read out, wherever the focus is.
  announce(r) {
    if (r.issuedBy && this.user && r.issuedBy !== this.user) return;
    const kind = KINDS[r.kind] ?? r.kind;
    this.q("#directives-live").textContent =
      `${kind} to ${r.unitId}: ${r.state}${r.reason ? `, ${r.reason}` : ""}`;
  }

  prune() {
    if (this.records.size <= KEPT) return;
    const old = [...this.records.values()].sort((a, b) => Number(a.issuedAtUs) - Number(b.issuedAtUs));
    for (const r of old.slice(0, this.records.size - KEPT)) this.records.delete(r.id);
  }

  shownRecords() {
    const all = this.q("#directives-all").checked;
    return [...this.records.values()]
      .filter((r) => all || r.unitId === this.unitId)
      .sort((a, b) => Number(b.issuedAtUs) - Number(a.issuedAtUs));
  }

  render() {
    if (this.root.hidden) return;
    this.root.setAttribute("aria-label", `Directives for ${this.unitId ?? "no unit"}`);
    const ul = this.q("#directive-list");
    const shown = this.shownRecords();
    const keep = new Set(shown.map((r) => r.id));
    for (const [id, item] of this.items) {
      if (!keep.has(id)) {
        item.li.remove();
        this.items.delete(id);
      }
    }
    shown.forEach((r, i) => {
      let item = this.items.get(r.id);
      if (!item) {
        item = this.makeItem(r.id);
        this.items.set(r.id, item);
      }
      this.fill(item, r);
      if (ul.children[i] !== item.li) ul.insertBefore(item.li, ul.children[i] ?? null);
    });
    this.q("#directives-empty").hidden = shown.length > 0;
  }

  makeItem(id) {
    const li = el("li", "directive");
    li.dataset.id = id;
    const head = el("div", "d-head");
    const state = el("span", "d-state");
    const kind = el("span", "d-kind");
    const unit = el("span", "d-unit");
    const time = el("time");
    head.append(state, kind, unit, time);
    const detail = el("div", "d-detail");
    const reason = el("div", "d-reason");
    const meta = el("div", "d-meta muted");
    li.append(head, detail, reason, meta);
    return { li, state, kind, unit, time, detail, reason, meta };
  }

  fill(item, r) {
    const failed = ["failed", "refused", "unanswered"].includes(r.state);
    item.li.className = `directive st-${r.state}${failed ? " failed" : ""}`;
    item.li.dataset.state = r.state;
    item.li.dataset.unit = r.unitId;
    item.li.dataset.kind = r.kind;
    const kind = KINDS[r.kind] ?? r.kind;
    item.li.setAttribute("aria-label", `${kind} to ${r.unitId}: ${r.state}`
      + `${r.reason ? `, ${r.reason}` : ""}`);
    item.state.textContent = r.state;
    item.kind.textContent = kind;
    item.unit.textContent = r.unitId;
    item.time.textContent = when(r.issuedAtUs);
    if (Number(r.issuedAtUs)) item.time.dateTime = new Date(Number(r.issuedAtUs) / 1000).toISOString();
    item.detail.textContent = r.detail ?? "";
    item.detail.hidden = !r.detail;
    item.reason.textContent = r.reason ?? "";
    item.reason.hidden = !r.reason;
    item.meta.textContent = [r.issuedBy && `by ${r.issuedBy}`, r.court && `court ${r.court}`,
      r.updatedAtUs && r.updatedAtUs !== r.issuedAtUs && `updated ${when(r.updatedAtUs)}`,
      !r.local && r.id].filter(Boolean).join(" · ");
  }

  /// Plain data for tests: every directive known here, newest first, and the refusals.
  state() {
    return {
      open: !this.root.hidden,
      unitId: this.unitId,
      list: [...this.records.values()]
        .sort((a, b) => Number(b.issuedAtUs) - Number(a.issuedAtUs))
        .map(({ id, unitId, kind, state, reason, detail, issuedBy, court, text }) =>
          ({ id, unitId, kind, state, reason, detail, issuedBy, court, text })),
      pending: this.pending.length,
      errors: this.errors.map((e) => ({ ...e })),
    };
  }
}
