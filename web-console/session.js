// The console's session with its hub: one WebSocket carrying the console API in the
// protobuf JSON mapping, and one RTCPeerConnection carrying every tile. The hub offers; we
// answer. See proto/tianwang/v1/console.proto.

export class Session extends EventTarget {
  constructor(token) {
    super();
    this.token = token;
    this.pc = null;
    this.ws = null;
    this.closed = false;
    this.pendingCandidates = [];
    // The hub names each tile's tracks with the tile id as their stream id.
    this.streams = new Map();
    // Push-to-talk: the microphone (asked for once), the unit talked to, and the mid of
    // the hub's receive-only audio m-line that carries it.
    this.mic = null;
    this.talk = null;
    // A video link: the camera and microphone (asked for at each link, released after).
    this.cam = null;
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.ws = new WebSocket(`${scheme}://${location.host}/api/session`);
    this.ws.onopen = () => {
      // The token travels in the first message, never in the URL.
      this.send({ auth: { token: this.token } });
      this.emit("open");
    };
    this.ws.onmessage = (m) => this.onEvent(JSON.parse(m.data));
    this.ws.onclose = (e) => {
      this.closed = true;
      this.emit("close", { code: e.code, reason: e.reason });
    };
  }

  close() {
    this.closed = true;
    this.ws?.close();
    this.pc?.close();
  }

  /// False when the session is not open (the message is dropped).
  send(message) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  addTile(tileId, unitId) {
    this.send({ addTile: { tileId, unitId } });
  }

  removeTile(tileId) {
    this.send({ removeTile: { tileId } });
  }

  requestKeyframe(tileId) {
    this.send({ keyframe: { tileId } });
  }

  /// Issues a directive ({ unitId, kind: "DIRECTIVE_KIND_…", text, bitrate, height }); its
  /// states come back as "directive" events, a refusal as an "error" event.
  direct(request) {
    return this.send({ directive: request });
  }

  /// Push-to-talk pressed: the microphone goes to `unitId` once the hub says where.
  /// Resolves false when the microphone is refused (the hub is not asked then).
  async talkStart(unitId) {
    if (!this.mic) {
      try {
        this.mic = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
      } catch (e) {
        this.emit("talk", { unitId, state: "STATE_REFUSED", reason: `microphone: ${e.message}` });
        return false;
      }
    }
    this.talk = { unitId, mid: null };
    return this.send({ talk: { unitId, on: true } });
  }

  /// A video link opened: the camera and microphone go to `unitId` once the hub says
  /// where. Resolves false when they are refused (the hub is not asked then).
  async linkStart(unitId) {
    if (!this.cam) {
      try {
        this.cam = await navigator.mediaDevices.getUserMedia({
          audio: true, video: { width: { ideal: 640 }, height: { ideal: 480 } } });
      } catch (e) {
        this.emit("talk", { unitId, state: "STATE_REFUSED", reason: `camera: ${e.message}` });
        return false;
      }
    }
    this.talk = { unitId, mid: null, videoMid: null, video: true };
    return this.send({ talk: { unitId, on: true, video: true } });
  }

  /// The camera of the link under way, for the self view.
  get camera() {
    return this.cam;
  }

  /// Push-to-talk released or the link ended: the microphone (and camera) stop at once,
  /// then the hub ends the talk.
  talkStop() {
    const unitId = this.talk?.unitId;
    const video = this.talk?.video;
    this.talk = null;
    this.attachMic().then(() => {
      if (video && !this.talk?.video) {
        this.cam?.getTracks().forEach((t) => t.stop());
        this.cam = null;
      }
    });
    if (unitId) this.send({ talk: { unitId, on: false, video: !!video } });
  }

  /// The talk line's sender carries the microphone while a talk is live (the camera's line
  /// the camera during a link), nothing otherwise.
  async attachMic() {
    const pc = this.pc;
    if (!pc) return;
    const source = this.talk?.video ? this.cam : this.mic;
    const audio = this.talk?.mid ? source?.getAudioTracks()[0] ?? null : null;
    const video = this.talk?.videoMid ? this.cam?.getVideoTracks()[0] ?? null : null;
    for (const t of pc.getTransceivers()) {
      let wanted;
      if (this.talkMids.has(t.mid)) wanted = t.mid === this.talk?.mid ? audio : null;
      else if (this.linkMids.has(t.mid)) wanted = t.mid === this.talk?.videoMid ? video : null;
      else continue;
      if (t.sender.track !== wanted) await t.sender.replaceTrack(wanted).catch(() => {});
    }
  }

  ensurePeer() {
    if (this.pc) return this.pc;
    const pc = new RTCPeerConnection({ iceServers: [] });
    pc.onicecandidate = (e) => {
      const c = e.candidate;
      this.send({
        iceCandidate: c
          ? { candidate: c.candidate, sdpMid: c.sdpMid ?? "", sdpMlineIndex: c.sdpMLineIndex ?? 0,
              usernameFragment: c.usernameFragment ?? "" }
          : { candidate: "" },
      });
    };
    pc.onconnectionstatechange = () => this.emit("peer", pc.connectionState);
    pc.ontrack = (e) => {
      const stream = e.streams[0];
      if (!stream) return;
      this.streams.set(stream.id, stream);
      this.emit("track", { tileId: stream.id, stream });
    };
    this.pc = pc;
    return pc;
  }

  async onEvent(event) {
    if (event.ready) this.emit("ready", event.ready);
    else if (event.unit) this.emit("unit", event.unit);
    else if (event.tile) this.emit("tile", event.tile);
    else if (event.stats) this.emit("stats", event.stats);
    else if (event.error) this.emit("error", event.error);
    else if (event.directive) this.emit("directive", event.directive);
    else if (event.courts) this.emit("courts", event.courts.courts ?? []);
    else if (event.alarm) this.emit("alarm", event.alarm);
    else if (event.telemetry) this.emit("telemetry", event.telemetry.points ?? []);
    else if (event.talk) {
      const t = event.talk;
      if (this.talk && t.unitId === this.talk.unitId && t.state === "STATE_LIVE") {
        this.talk.mid = t.mid;
        this.talk.videoMid = t.videoMid || null;
        this.talk.id = t.talkId;
      }
      if (t.state === "STATE_REFUSED" && this.talk?.unitId === t.unitId) this.talk = null;
      await this.attachMic();
      this.emit("talk", t);
    }
    else if (event.offer) await this.answer(event.offer);
    else if (event.iceCandidate) await this.remoteCandidate(event.iceCandidate);
  }

  async answer(offer) {
    const pc = this.ensurePeer();
    try {
      await pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
      // The lines the hub names for us to send on: its audio one is the talk line (the
      // microphone goes on while a talk is live), its video one a video link's camera
      // line (H.264 first, which the hub records in a form every player here plays).
      // Other receive-only lines are idle tiles' lines, to stay receiving.
      const send = new Set(offer.sendMids ?? []);
      this.talkMids = midsOf(offer.sdp, "audio", send);
      this.linkMids = midsOf(offer.sdp, "video", send);
      for (const t of pc.getTransceivers()) {
        const ours = this.talkMids.has(t.mid) || this.linkMids.has(t.mid);
        if (ours && t.direction !== "sendonly") t.direction = "sendonly";
        if (this.linkMids.has(t.mid)) preferH264(t);
      }
      for (const c of this.pendingCandidates.splice(0)) await pc.addIceCandidate(c);
      const answer = await pc.createAnswer();
      await pc.setLocalDescription(answer);
      this.send({ answer: { type: "answer", sdp: pc.localDescription.sdp, revision: offer.revision } });
      this.emit("negotiated", pc);
      await this.attachMic();
    } catch (e) {
      this.emit("error", { message: `negotiation failed: ${e.message}` });
    }
  }

  async remoteCandidate(c) {
    const init = c.candidate
      ? { candidate: c.candidate, sdpMid: c.sdpMid || null, sdpMLineIndex: c.sdpMlineIndex ?? 0 }
      : null;
    if (!init) return;
    if (!this.pc?.remoteDescription) {
      this.pendingCandidates.push(init);
      return;
    }
    try {
      await this.pc.addIceCandidate(init);
    } catch (e) {
      this.emit("error", { message: `bad ICE candidate from the hub: ${e.message}` });
    }
  }

  talkMids = new Set();
  linkMids = new Set();

  /// The media of a tile, once its tracks have arrived.
  streamFor(tileId) {
    return this.streams.get(tileId) ?? null;
  }
}

/// Constrained baseline H.264 first on a transceiver we send video on (when the browser
/// lets us choose); the rest after it, so a browser without it still sends something.
function preferH264(transceiver) {
  const codecs = RTCRtpReceiver.getCapabilities?.("video")?.codecs;
  if (!codecs || !transceiver.setCodecPreferences) return;
  const rank = (c) => (/h264/i.test(c.mimeType) && /packetization-mode=1/.test(c.sdpFmtpLine ?? "")
    ? (/42e01f/.test(c.sdpFmtpLine) ? 0 : 1) : 2);
  try {
    transceiver.setCodecPreferences([...codecs].sort((a, b) => rank(a) - rank(b)));
  } catch {
    // Preferences are a wish: the browser's default order works too.
  }
}

/// The mids among `wanted` of the offer's m-lines of `kind`.
function midsOf(sdp, kind, wanted) {
  const mids = new Set();
  for (const section of sdp.split(/\r?\nm=/).slice(1)) {
    if (!section.startsWith(kind)) continue;
    const mid = /\r?\na=mid:(\S+)/.exec(section)?.[1];
    if (mid && wanted.has(mid)) mids.add(mid);
  }
  return mids;
}
