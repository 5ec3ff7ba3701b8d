// The alarm list: the hub's deviation alarms (/api/alarms, polled), newest first, with
// Acknowledge and Resolve, each with a comment. A new critical alarm beeps once and stays
// highlighted until someone acknowledges it. Rows are the hub's, in snake_case. Alarms of
// the courts below come too (`below`, with their `court`); one escalated here because
// nobody there acknowledged it in time beeps like a critical one, and acknowledging it
// goes down to its court's hub (`?court=`).
import { fmtTime } from "./cases.js";
import { HubError, hubFetch } from "./player.js";

// Alarms are pushed over the session as they change; reading the whole list now and then
// only catches up with what a dropped session missed.
const POLL_MS = 30_000;
// The hub returns at most 1000; a list longer than this is not read on a shift anyway.
const SHOWN = 200;
const VERBS = { ack: "Acknowledge", resolve: "Resolve" };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const today = (us) => new Date(Number(us) / 1000).toDateString() === new Date().toDateString();
const when = (us) => fmtTime(us, !today(us));
// Rules put raw µs timestamps in their evidence ("offline since 1795…"): show them as times.
const readable = (text) => String(text ?? "").replace(/\b1\d{15}\b/g, (us) => when(us));

export class Alarms extends EventTarget {
  constructor(token, root, badge) {
    super();
    this.token = token;
    this.root = root;
    this.badge = badge;
    this.q = (sel) => root.querySelector(sel);
    this.list = [];
    this.items = new Map();
    this.seen = new Set();
    this.sounded = new Set();
    this.escalated = new Set();
    this.beepLog = [];
    this.blocked = 0;
    this.errors = [];
    this.polls = 0;
    this.loaded = false;
    this.pollError = null;
    this.inflight = null;
    this.timer = null;
    // Made during the sign-in click when there is one: browsers let a context made in a user
    // gesture play; one made later (a reload with a saved token) waits for the next gesture.
    this.audio = window.AudioContext ? new AudioContext() : null;
    const unlock = () => this.audio?.state === "suspended" && this.audio.resume().then(
      () => this.showSoundState(), () => {});
    document.addEventListener("pointerdown", unlock, true);
    document.addEventListener("keydown", unlock, true);
    this.audio?.addEventListener("statechange", () => this.showSoundState());
    this.q("#alarms-sound button").onclick = () => unlock();
    this.q("#alarms-hide-resolved").onchange = () => this.render();
    this.q("#alarm-list").addEventListener("keydown", (e) => this.onListKey(e));
    badge.onclick = () => this.focus();
  }

  /// Pushed alarms (the session's `alarm` events), merged into the list as they come.
  listen(session) {
    session.addEventListener("alarm", (e) => this.pushed(e.detail));
  }

  pushed({ alarm: a, below = false }) {
    if (!a || !this.loaded) return;
    const text = (s) => s || null;
    const row = {
      id: a.id, rule: a.rule, severity: a.severity, unit: a.unitId,
      case_number: text(a.caseNumber), operation_id: text(a.operationId), raised_us: Number(a.raisedUs ?? 0),
      evidence: a.evidence ?? "", state: a.state, acked_by: text(a.ackedBy),
      resolved_by: text(a.resolvedBy), comment: text(a.comment), court: a.court,
      escalated: Boolean(a.escalated), below,
    };
    const same = (x) => x.id === row.id && (x.court ?? "") === (row.court ?? "");
    const old = this.list.find(same);
    const list = this.list.filter((x) => !same(x));
    // An alarm below that is resolved leaves the list, as /api/alarms has it.
    if (!(below && row.state === "resolved")) list.push({ ...old, ...row });
    this.pushes = (this.pushes ?? 0) + 1;
    this.take(list);
  }

  start() {
    this.poll().catch(() => {});
    this.timer = setInterval(() => this.poll().catch(() => {}), POLL_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.audio?.close().catch(() => {});
  }

  /// Reads the list once; a poll still running is shared, not doubled.
  poll() {
    this.inflight ??= this.fetchList().finally(() => { this.inflight = null; });
    return this.inflight;
  }

  async fetchList() {
    let body;
    try {
      body = await (await hubFetch("/api/alarms", this.token)).json();
    } catch (e) {
      this.pollError = e instanceof HubError ? `${e.status}: ${e.message}` : e.message;
      this.q("#alarms-status").textContent = `alarms: ${this.pollError}`;
      throw e;
    }
    this.pollError = null;
    this.q("#alarms-status").textContent = "";
    this.polls += 1;
    this.loaded = true;
    this.take(body.alarms ?? []);
    return this.state();
  }

  take(rows) {
    this.list = rows;
    const fresh = rows.filter((a) => !this.seen.has(a.id));
    for (const a of fresh) this.seen.add(a.id);
    // Only a critical alarm nobody has taken yet calls for a sound: acknowledged or resolved
    // ones (another console's work, or before this sign-in) are there to read, not to hear.
    const escalated = rows.filter((a) => a.below && a.escalated && a.state === "raised"
      && !this.escalated.has(a.id));
    for (const a of escalated) this.escalated.add(a.id);
    const loud = fresh.filter((a) => a.severity === "critical" && a.state === "raised")
      .concat(escalated.filter((a) => !(a.severity === "critical" && fresh.includes(a))));
    if (loud.length) {
      for (const a of loud) this.sounded.add(a.id);
      this.beep(loud.map((a) => a.id));
      this.announce(loud);
    }
    this.render();
    this.dispatchEvent(new Event("change"));
  }

  /// Three short square-wave pulses: heard over a room's noise, no audio file to serve.
  beep(ids) {
    const ctx = this.audio;
    if (!ctx || ctx.state !== "running") {
      // Before any gesture on a reloaded page: the panel says so and the next click unlocks.
      this.blocked += 1;
      this.showSoundState();
      return;
    }
    const t = ctx.currentTime + 0.02;
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.type = "square";
    osc.frequency.value = 880;
    gain.gain.setValueAtTime(0, t);
    for (let i = 0; i < 3; i++) {
      const s = t + i * 0.25;
      gain.gain.setValueAtTime(0, s);
      gain.gain.linearRampToValueAtTime(0.15, s + 0.01);
      gain.gain.setValueAtTime(0.15, s + 0.14);
      gain.gain.linearRampToValueAtTime(0, s + 0.16);
    }
    osc.connect(gain).connect(ctx.destination);
    osc.start(t);
    osc.stop(t + 0.8);
    this.beepLog.push({ atMs: Date.now(), ids });
  }

  showSoundState() {
    this.q("#alarms-sound").hidden = !this.audio || this.audio.state === "running";
  }

  /// A screen reader hears new critical alarms even when the focus is on the wall.
  announce(alarms) {
    this.q("#alarms-live").textContent = alarms
      .map((a) => `Critical alarm: ${a.rule.replaceAll("_", " ")}, ${a.unit}`).join(". ");
  }

  /// Units with an alarm not yet resolved (the map colours them).
  activeUnits() {
    return new Set(this.list.filter((a) => a.state !== "resolved").map((a) => a.unit));
  }

  render() {
    const ul = this.q("#alarm-list");
    const hide = this.q("#alarms-hide-resolved").checked;
    const shown = this.list.filter((a) => !hide || a.state !== "resolved").slice(0, SHOWN);
    const keep = new Set(shown.map((a) => a.id));
    for (const [id, item] of this.items) {
      if (!keep.has(id)) {
        item.li.remove();
        this.items.delete(id);
      }
    }
    // Items are updated in place and only moved when the order changed, so a comment being
    // typed or a focused button survives the next poll.
    shown.forEach((a, i) => {
      let item = this.items.get(a.id);
      if (!item) {
        item = this.makeItem(a.id);
        this.items.set(a.id, item);
      }
      this.fill(item, a);
      if (ul.children[i] !== item.li) ul.insertBefore(item.li, ul.children[i] ?? null);
    });
    const empty = this.q("#alarms-empty");
    empty.hidden = shown.length > 0;
    empty.textContent = this.list.length ? "Only resolved alarms (hidden)." : "No alarms.";
    const open = this.list.filter((a) => a.state === "raised");
    const critical = open.some((a) => a.severity === "critical");
    this.badge.textContent = `${open.length} alarm${open.length === 1 ? "" : "s"}`;
    this.badge.className = `badge ${critical ? "bad alert" : open.length ? "warn" : ""}`.trim();
    this.q("#alarm-count").textContent = `${open.length} raised · ${this.list.length}`;
  }

  makeItem(id) {
    const li = el("li", "alarm");
    li.dataset.id = id;
    li.tabIndex = -1;
    const head = el("div", "a-head");
    const sev = el("span", "sev");
    const rule = el("span", "rule");
    const unit = el("span", "unit");
    const time = el("time");
    head.append(sev, rule, unit, time);
    const evidence = el("div", "a-evidence");
    const meta = el("div", "a-meta muted");
    const state = el("div", "a-state");
    const actions = el("div", "a-actions");
    const ack = el("button", "ack", VERBS.ack);
    const resolve = el("button", "resolve", VERBS.resolve);
    actions.append(ack, resolve);
    const form = el("form", "a-form");
    form.hidden = true;
    const input = el("input");
    input.type = "text";
    input.maxLength = 500;
    input.autocomplete = "off";
    const submit = el("button", "submit");
    submit.type = "submit";
    const cancel = el("button", "cancel", "Cancel");
    cancel.type = "button";
    form.append(input, submit, cancel);
    const error = el("p", "error");
    error.setAttribute("role", "alert");
    li.append(head, evidence, meta, state, actions, form, error);
    const item = { li, sev, rule, unit, time, evidence, meta, state, ack, resolve, form, input,
      submit, error, action: null };
    ack.onclick = () => this.openForm(item, "ack");
    resolve.onclick = () => this.openForm(item, "resolve");
    cancel.onclick = () => this.closeForm(item);
    form.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.stopPropagation();
        this.closeForm(item);
      }
    });
    form.onsubmit = (e) => {
      e.preventDefault();
      this.submit(item).catch(() => {});
    };
    return item;
  }

  fill(item, a) {
    const { li } = item;
    li.className = `alarm sev-${a.severity} st-${a.state}`;
    // Highlighted while a critical alarm waits for someone; flashing if it is new here.
    li.classList.toggle("alert", a.severity === "critical" && a.state === "raised");
    li.classList.toggle("fresh", this.sounded.has(a.id) && a.state === "raised");
    li.setAttribute("aria-label", `${a.severity} ${a.rule.replaceAll("_", " ")}, ${a.unit}, `
      + `${a.state}, ${when(a.raised_us)}`);
    item.sev.textContent = a.severity;
    item.rule.textContent = a.rule.replaceAll("_", " ");
    item.rule.title = a.rule;
    item.unit.textContent = a.unit;
    item.time.textContent = when(a.raised_us);
    item.time.dateTime = new Date(Number(a.raised_us) / 1000).toISOString();
    item.evidence.textContent = readable(a.evidence);
    item.meta.textContent = [
      a.below && `court ${a.court}`,
      a.escalated && (a.below ? "escalated here: not acknowledged in time"
        : "escalated to the parent court"),
      a.case_number, a.operation_id && `operation ${a.operation_id}`,
    ].filter(Boolean).join(" · ");
    li.classList.toggle("escalated", Boolean(a.below && a.escalated && a.state === "raised"));
    const parts = [a.state];
    if (a.acked_by) parts.push(`acknowledged by ${a.acked_by} ${when(a.acked_us)}`);
    if (a.resolved_by) parts.push(`resolved by ${a.resolved_by} ${when(a.resolved_us)}`);
    if (a.comment) parts.push(`“${a.comment}”`);
    item.state.textContent = parts.join(" · ");
    item.ack.hidden = a.state !== "raised";
    item.resolve.hidden = a.state === "resolved";
    if (a.state === "resolved" && item.action) this.closeForm(item, false);
  }

  openForm(item, action) {
    item.action = action;
    item.form.hidden = false;
    item.form.dataset.action = action;
    item.submit.textContent = VERBS[action];
    item.input.placeholder = action === "ack" ? "comment: who is on it" : "comment: what was done";
    item.input.setAttribute("aria-label", `${VERBS[action]} ${item.li.dataset.id}: comment`);
    item.error.textContent = "";
    item.input.focus();
  }

  closeForm(item, refocus = true) {
    const verb = item.action;
    item.action = null;
    item.form.hidden = true;
    item.input.value = "";
    if (!refocus) return;
    const back = verb === "resolve" ? item.resolve : item.ack;
    (back.hidden ? item.li : back).focus();
  }

  async submit(item) {
    const id = item.li.dataset.id;
    const action = item.action;
    item.submit.disabled = true;
    try {
      const r = await this.settle(id, action, item.input.value);
      if (r.ok) {
        this.closeForm(item, false);
        item.li.focus();
      } else {
        item.error.textContent = r.message;
      }
      return r;
    } finally {
      item.submit.disabled = false;
    }
  }

  ack(id, comment = "") {
    return this.settle(id, "ack", comment);
  }

  resolve(id, comment = "") {
    return this.settle(id, "resolve", comment);
  }

  /// POSTs an acknowledgement or a resolution. The hub's refusal (403 role, 404 unknown, 409
  /// settled already) is shown and returned, never thrown: it is an answer, not a fault.
  async settle(id, action, comment) {
    const row = this.list.find((a) => a.id === id);
    const court = row?.below ? `?court=${encodeURIComponent(row.court)}` : "";
    const url = `/api/alarms/${encodeURIComponent(id)}/${action}${court}`;
    let status = 0;
    let body = null;
    try {
      const res = await fetch(url, {
        method: "POST",
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
        body: JSON.stringify({ comment: comment.trim() }),
      });
      status = res.status;
      body = await res.json().catch(() => null);
    } catch (e) {
      body = { error: e.message };
    }
    if (status === 202 && body?.forwarded) {
      // Settled by the alarm's own hub; its new state comes back with the next polls.
      this.q("#alarms-error").textContent = "";
      this.closeFormById(id);
      this.poll().catch(() => {});
      return { ok: true, status, forwarded: true };
    }
    if (status === 200 && body?.id) {
      this.list = this.list.map((a) => (a.id === body.id ? body : a));
      this.render();
      this.dispatchEvent(new Event("change"));
      this.q("#alarms-error").textContent = "";
      this.poll().catch(() => {});
      return { ok: true, status, alarm: body };
    }
    const why = body?.error ?? `HTTP ${status}`;
    const message = `${VERBS[action]} ${id}: ${status ? `${status} ` : ""}${why}`;
    this.errors.push({ id, action, status, message });
    this.q("#alarms-error").textContent = message;
    const item = this.items.get(id);
    if (item) item.error.textContent = message;
    return { ok: false, status, message };
  }

  closeFormById(id) {
    const item = this.items.get(id);
    if (item?.action) this.closeForm(item, false);
  }

  /// Keyboard: the badge (or key a) lands on the newest alarm; arrows move along the list.
  focus() {
    const ul = this.q("#alarm-list");
    (ul.querySelector("li.alert") ?? ul.querySelector("li") ?? this.q("#alarms-empty"))?.focus();
  }

  onListKey(e) {
    const li = e.target.closest?.("li.alarm");
    if (!li || e.target !== li) return;
    let next = null;
    if (e.key === "ArrowDown") next = li.nextElementSibling;
    else if (e.key === "ArrowUp") next = li.previousElementSibling;
    else if (e.key === "Enter") next = [...li.querySelectorAll(".a-actions button")].find((b) => !b.hidden);
    else return;
    e.preventDefault();
    next?.focus();
  }

  /// Plain data for tests.
  state() {
    return {
      list: this.list.map((a) => ({ ...a })),
      seen: [...this.seen],
      sounded: [...this.sounded],
      beeps: this.beepLog.length,
      beepLog: this.beepLog.map((b) => ({ ...b, ids: [...b.ids] })),
      blocked: this.blocked,
      audio: this.audio?.state ?? "none",
      errors: this.errors.map((e) => ({ ...e })),
      polls: this.polls,
      pushes: this.pushes ?? 0,
      loaded: this.loaded,
      pollError: this.pollError,
    };
  }
}
