// Recorded playback through Media Source Extensions: one recording (an init segment, then
// GOP-aligned moof+mdat media segments) into one SourceBuffer. Segments are fetched on demand
// around the playhead, so a seek anywhere in a long recording costs one or two fetches.

// The video track's timescale: a segment's mediaStart/mediaDuration are in these units.
const TIMESCALE = 90000;
// Seconds kept ahead of and behind the playhead.
const AHEAD = 60;
const BEHIND = 60;
// A segment counts as loaded when the buffer covers it but for this much at each end (the
// audio and video tracks of one segment end a few ms apart).
const EDGE = 0.05;
// How far past a range's start a skip or a stuck seek lands: more than an audio frame.
const NUDGE = 0.05;

/// An HTTP refusal from the hub: its status and its `{"error": …}` message.
export class HubError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/// Fetches `url` with the console token; throws a HubError for a refusal.
export async function hubFetch(url, token) {
  const res = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
  if (res.ok) return res;
  let message = `${res.status} ${res.statusText}`;
  try {
    message = (await res.json()).error ?? message;
  } catch {
    // Not JSON (a proxy's page, say): the status line says enough.
  }
  throw new HubError(res.status, message);
}

/// The MIME type for MSE. The hub lists either a whole type or only the codecs.
export function mimeOf(codecs) {
  return codecs.includes("/") ? codecs : `video/mp4; codecs="${codecs}"`;
}

async function sha256Hex(buf) {
  // crypto.subtle exists only in secure contexts (https, localhost): elsewhere the hub's own
  // check before serving is the one that counts.
  if (!globalThis.crypto?.subtle) return null;
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class Player extends EventTarget {
  /// `rec` is one entry of /api/recordings' `recordings` (segments in order).
  constructor(video, rec, token) {
    super();
    this.video = video;
    this.token = token;
    this.unit = rec.unit;
    this.recording = rec.recording;
    this.mime = mimeOf(rec.codecs || "avc1.42e01f,opus");
    this.segments = Player.segmentsOf(rec);
    this.initUrl = rec.initUrl;
    this.errors = [];
    // Segments the hub refused (damaged, deleted): number → reason. Playback skips them.
    this.bad = new Map();
    this.tries = new Map();
    this.verified = 0;
    this.fetches = 0;
    this.lastSeek = null;
    this.closed = false;
    this.pumping = false;
    this.again = false;
    this.onVideo = {
      seeking: () => {
        this.skipBad();
        this.pump();
        this.watchSeek();
      },
      seeked: () => {
        if (this.lastSeek && this.lastSeek.landed == null) this.lastSeek.landed = video.currentTime;
        this.emit("change");
      },
      timeupdate: () => {
        this.skipBad();
        this.pump();
        this.emit("time");
      },
      waiting: () => this.skipBad(),
      error: () => {
        const e = video.error;
        if (e) this.fail("video", `${e.message || "media error"} (code ${e.code})`);
      },
    };
  }

  static segmentsOf(rec) {
    // 64-bit fields arrive as strings; µs since the epoch stay exact as Numbers until 2255.
    return (rec.segments ?? []).map((s) => ({
      number: s.number,
      url: s.url,
      sha256: s.sha256,
      startUs: Number(s.startUs ?? 0),
      endUs: Number(s.endUs ?? 0),
      t0: Number(s.mediaStart ?? 0) / TIMESCALE,
      t1: (Number(s.mediaStart ?? 0) + Number(s.mediaDuration ?? 0)) / TIMESCALE,
    }));
  }

  /// Takes a newer listing of the same recording (one still being recorded grows).
  update(rec) {
    this.segments = Player.segmentsOf(rec);
    const last = this.segments.at(-1);
    if (last && this.ms?.readyState === "open" && !this.sb.updating && last.t1 > this.ms.duration) {
      this.ms.duration = last.t1;
    }
    this.pump();
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  fail(source, message) {
    // A closed player's last fetch or append fails on purpose.
    if (this.closed) return;
    this.errors.push({ source, message });
    this.emit("error", { source, message });
  }

  /// Opens the MediaSource and appends the init segment; playback starts at wall-clock time
  /// `atUs` (or at the recording's first segment). Media segments follow in the background.
  async start(atUs = null) {
    if (!window.MediaSource || !MediaSource.isTypeSupported(this.mime)) {
      throw new Error(`this browser cannot play ${this.mime}`);
    }
    const video = this.video;
    for (const [type, fn] of Object.entries(this.onVideo)) video.addEventListener(type, fn);
    this.ms = new MediaSource();
    this.url = URL.createObjectURL(this.ms);
    video.src = this.url;
    await new Promise((resolve, reject) => {
      this.ms.addEventListener("sourceopen", resolve, { once: true });
      setTimeout(() => reject(new Error("the MediaSource did not open")), 10000);
    });
    if (this.closed) return;
    this.sb = this.ms.addSourceBuffer(this.mime);
    this.sb.addEventListener("error", () =>
      this.fail("sourcebuffer", "the browser refused a segment"));
    this.ms.addEventListener("sourceclose", () => {
      if (!this.closed) this.fail("mediasource", "the MediaSource closed");
    });
    // The whole recording's length, so the video's own seek bar spans all of it.
    const last = this.segments.at(-1);
    if (last) this.ms.duration = last.t1;
    const init = await (await hubFetch(this.initUrl, this.token)).arrayBuffer();
    this.fetches += 1;
    await this.append(init);
    if (atUs == null || !this.seekWall(atUs)) video.currentTime = this.segments[0]?.t0 ?? 0;
    this.pump();
  }

  close() {
    this.closed = true;
    clearTimeout(this.seekTimer);
    for (const [type, fn] of Object.entries(this.onVideo)) this.video.removeEventListener(type, fn);
    this.video.pause();
    this.video.removeAttribute("src");
    this.video.load();
    if (this.url) URL.revokeObjectURL(this.url);
  }

  /// The index of the segment holding media time `t`, or -1.
  indexAt(t) {
    return this.segments.findIndex((s) => s.t0 <= t && t < s.t1);
  }

  /// The index of the segment holding wall-clock time `us`, or -1.
  indexAtWall(us) {
    return this.segments.findIndex((s) => s.startUs <= us && us < s.endUs);
  }

  /// Wall-clock time (µs) of media time `t`, or null outside the segments.
  wallAt(t) {
    const s = this.segments[this.indexAt(t)];
    return s ? s.startUs + (t - s.t0) * 1e6 : null;
  }

  /// Seeks to wall-clock time `us`; false when no segment of this recording holds it.
  seekWall(us) {
    const s = this.segments[this.indexAtWall(us)];
    if (!s) return false;
    // Wall-clock and media durations differ by the capture clock's drift: stay inside.
    const t = s.t0 + Math.min((us - s.startUs) / 1e6, s.t1 - s.t0 - 0.001);
    this.seekMedia(t);
    return true;
  }

  seekMedia(t) {
    this.lastSeek = { target: t, landed: null };
    this.video.currentTime = t;
    this.pump();
  }

  loaded(s) {
    const b = this.sb?.buffered;
    if (!b) return false;
    for (let i = 0; i < b.length; i++) {
      if (b.start(i) <= s.t0 + EDGE && b.end(i) >= s.t1 - EDGE) return true;
    }
    return false;
  }

  /// The next segment to fetch: the first one from the playhead on, within AHEAD, not in the
  /// buffer (by the buffer itself, so the browser's own eviction is noticed too).
  next() {
    const t = this.video.currentTime;
    let i = this.indexAt(t);
    if (i < 0) i = this.segments.findIndex((s) => s.t0 > t);
    if (i < 0) return -1;
    for (; i < this.segments.length && this.segments[i].t0 < t + AHEAD; i++) {
      const s = this.segments[i];
      if (!this.bad.has(s.number) && !this.loaded(s)) return i;
    }
    return -1;
  }

  /// Fetches and appends what the playhead needs; one at a time, re-run when called while
  /// busy (a seek during a fetch is served right after it).
  async pump() {
    if (!this.sb || this.closed) return;
    if (this.pumping) {
      this.again = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.again = false;
        for (let i = this.next(); i >= 0 && !this.closed; i = this.next()) {
          await this.load(this.segments[i]);
        }
      } while (this.again && !this.closed);
      this.finishIfComplete();
    } catch (e) {
      this.fail("fetch", e.message);
    } finally {
      this.pumping = false;
    }
  }

  async load(s) {
    const tries = this.tries.get(s.number) ?? 0;
    if (tries >= 2) {
      // Appended twice and still not in the buffer: the browser drops it; do not loop.
      this.markBad(s, "the browser did not buffer this segment");
      return;
    }
    let buf;
    try {
      buf = await (await hubFetch(s.url, this.token)).arrayBuffer();
      this.fetches += 1;
    } catch (e) {
      if (e instanceof HubError && [404, 409, 410].includes(e.status)) {
        this.markBad(s, e.status === 409 ? `damaged: ${e.message}` : e.message, e.status);
        return;
      }
      throw e;
    }
    const hash = await sha256Hex(buf);
    if (hash !== null && hash !== s.sha256) {
      this.markBad(s, "damaged: differs from its signed hash (checked in this browser)", 409);
      return;
    }
    if (hash !== null) this.verified += 1;
    this.trim();
    try {
      await this.append(buf);
    } catch (e) {
      if (e.name !== "QuotaExceededError") throw e;
      // The browser's buffer is full: keep only what is near the playhead, then retry once.
      await this.trim(5);
      await this.append(buf);
    }
    if (this.loaded(s)) this.tries.delete(s.number);
    else this.tries.set(s.number, tries + 1);
  }

  markBad(s, reason, status = 0) {
    this.bad.set(s.number, reason);
    this.emit("bad", { number: s.number, reason, status, startUs: s.startUs, endUs: s.endUs });
    this.skipBad();
  }

  /// A playhead in a refused segment, or stalled at the end of the buffer right before one,
  /// moves on to the next playable segment (the browser does not jump holes by itself).
  skipBad() {
    if (!this.bad.size) return;
    const t = this.video.currentTime;
    let i = this.indexAt(t);
    if (i < 0) return;
    if (!this.bad.has(this.segments[i].number)) {
      if (!this.bad.has(this.segments[i + 1]?.number) || this.bufferedEnd(t) - t > 0.15) return;
      i += 1;
    }
    while (i < this.segments.length && this.bad.has(this.segments[i].number)) i++;
    // Just inside: a segment's audio may begin a frame after its video (see watchSeek).
    if (i < this.segments.length) this.video.currentTime = this.segments[i].t0 + NUDGE;
  }

  /// Chromium can leave a seek to the very start of a buffered range (after a hole) pending
  /// for good when the audio there begins a little after the video: nudge it inside.
  watchSeek() {
    clearTimeout(this.seekTimer);
    const target = this.video.currentTime;
    this.seekTimer = setTimeout(() => {
      const v = this.video;
      if (this.closed || !v.seeking || v.currentTime !== target) return;
      if (this.bufferedEnd(target, 0.1) > target + 2 * NUDGE) v.currentTime = target + NUDGE;
    }, 1000);
  }

  /// The end of the buffered range holding `t`, or beginning at most `early` s after it (or
  /// `t` itself when none does).
  bufferedEnd(t, early = 0) {
    const b = this.sb?.buffered;
    for (let i = 0; b && i < b.length; i++) {
      if (b.start(i) - early <= t && t <= b.end(i)) return b.end(i);
    }
    return t;
  }

  /// Drops whole segments more than `behind` seconds before the playhead.
  async trim(behind = BEHIND) {
    const b = this.sb.buffered;
    if (!b.length || this.sb.updating) return;
    const i = this.indexAt(this.video.currentTime - behind);
    const end = i >= 0 ? this.segments[i].t0 : 0;
    if (end > b.start(0)) await this.op(() => this.sb.remove(0, end));
  }

  finishIfComplete() {
    // All of it is in: end the stream so the video ends instead of waiting for more.
    const complete = this.segments.every((s) => this.bad.has(s.number) || this.loaded(s));
    if (complete && this.ms.readyState === "open" && !this.sb.updating) this.ms.endOfStream();
  }

  append(buf) {
    return this.op(() => this.sb.appendBuffer(buf));
  }

  /// Runs one SourceBuffer operation and waits for its end ("error" comes before it).
  op(start) {
    return new Promise((resolve, reject) => {
      const sb = this.sb;
      let failed = false;
      const onError = () => { failed = true; };
      const onEnd = () => {
        sb.removeEventListener("error", onError);
        sb.removeEventListener("updateend", onEnd);
        if (failed) reject(new Error("the SourceBuffer failed"));
        else resolve();
      };
      sb.addEventListener("error", onError);
      sb.addEventListener("updateend", onEnd);
      try {
        start();
      } catch (e) {
        sb.removeEventListener("error", onError);
        sb.removeEventListener("updateend", onEnd);
        reject(e);
      }
    });
  }

  /// Plain data for tests and the info line.
  state() {
    const v = this.video;
    const b = this.sb?.buffered;
    const buffered = [];
    for (let i = 0; b && i < b.length; i++) buffered.push([b.start(i), b.end(i)]);
    return {
      unit: this.unit,
      recording: this.recording,
      mime: this.mime,
      readyState: this.ms?.readyState ?? "none",
      segments: this.segments.map((s) => ({ ...s, loaded: this.loaded(s) })),
      buffered,
      currentTime: v.currentTime,
      duration: v.duration,
      wallUs: this.wallAt(v.currentTime),
      paused: v.paused,
      ended: v.ended,
      seeking: v.seeking,
      videoWidth: v.videoWidth,
      videoHeight: v.videoHeight,
      mediaError: v.error ? { code: v.error.code, message: v.error.message } : null,
      errors: [...this.errors],
      bad: Object.fromEntries(this.bad),
      verified: this.verified,
      fetches: this.fetches,
      lastSeek: this.lastSeek,
    };
  }
}
