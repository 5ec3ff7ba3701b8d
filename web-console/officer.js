// The officer app: a phone becomes a unit. Camera and microphone go to the hub over WHIP
// (POST /whip/{unit} with the device token); position (Geolocation), battery (Battery
// API), SOS and directive acknowledgements go over the unit's control session
// (/api/unit, the QUIC agent's control messages in protobuf JSON). Talkback from the
// command centre arrives on the audio line it offers to receive on. When the network
// changes it restarts ICE on the same WHIP session (PATCH with an SDP fragment); when that
// fails, it publishes anew.

const $ = (id) => document.getElementById(id);
const TELEMETRY_MS = 1000;
const SOS_MS = 30000;

const state = {
  token: "",
  unit: "",
  stream: null,
  pc: null,
  resource: null,
  ws: null,
  position: null,
  battery: null,
  sosUntil: 0,
  directives: new Map(),
  seen: new Set(),
  publishes: 0,
  retry: 0,
  stopped: false,
};

/// The unit a device token is for (its `sub`): shown, and the WHIP path. The hub checks.
function unitOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).sub ?? "";
  } catch {
    return "";
  }
}

function show(text) {
  $("state").textContent = text;
}

function fail(text) {
  $("error").textContent = text;
}

async function publish() {
  state.publishes += 1;
  const pc = new RTCPeerConnection();
  for (const track of state.stream.getTracks()) {
    // Audio both ways: the command centre's voice (talkback) comes back on it.
    const t = pc.addTransceiver(track, {
      direction: track.kind === "audio" ? "sendrecv" : "sendonly" });
    if (track.kind === "video") {
      const h264 = RTCRtpSender.getCapabilities("video").codecs.filter((c) =>
        c.mimeType === "video/H264" && /packetization-mode=1/.test(c.sdpFmtpLine ?? "")
        && /profile-level-id=42/.test(c.sdpFmtpLine ?? ""));
      if (h264.length) t.setCodecPreferences(h264);
    }
  }
  pc.ontrack = (e) => {
    if (e.track.kind === "audio") $("talkback").srcObject = new MediaStream([e.track]);
  };
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const res = await fetch(`/whip/${encodeURIComponent(state.unit)}`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${state.token}` },
    body: pc.localDescription.sdp,
  });
  const text = await res.text();
  if (res.status !== 201) {
    pc.close();
    throw new Error(`${res.status}: ${text}`);
  }
  await pc.setRemoteDescription({ type: "answer", sdp: text });
  state.pc = pc;
  state.resource = res.headers.get("Location");
  state.etag = res.headers.get("ETag");
  let lost = null;
  pc.onconnectionstatechange = () => {
    show(pc.connectionState);
    if (state.pc !== pc) return;
    clearTimeout(lost);
    if (pc.connectionState === "failed") recover();
    // Disconnected may heal by itself; if it does not soon, restart ICE.
    if (pc.connectionState === "disconnected") lost = setTimeout(recover, 2000);
    if (pc.connectionState === "closed") republish();
  };
}

/// Waits (at most 3 s) until every local candidate is in the description: WHIP here
/// sends them with the offer, not trickled one by one.
function gathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange",
      () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 3000);
  });
}

/// The SDP fragment of an ICE restart (RFC 8840): credentials, then each m-line with its
/// mid and candidates.
function restartFragment(sdp) {
  const lines = sdp.split(/\r?\n/);
  const ufrag = lines.find((l) => l.startsWith("a=ice-ufrag:"));
  const pwd = lines.find((l) => l.startsWith("a=ice-pwd:"));
  const media = lines.filter((l) => l.startsWith("m=") || l.startsWith("a=mid:")
    || l.startsWith("a=candidate:"));
  return [ufrag, pwd, ...media].join("\r\n") + "\r\n";
}

/// The answer with the hub's new credentials and candidates from its fragment.
function patchedAnswer(sdp, fragment) {
  const frag = fragment.split(/\r?\n/);
  const ufrag = frag.find((l) => l.startsWith("a=ice-ufrag:"));
  const pwd = frag.find((l) => l.startsWith("a=ice-pwd:"));
  const candidates = frag.filter((l) => l.startsWith("a=candidate:"));
  const out = [];
  let first = true;
  for (const line of sdp.split(/\r?\n/)) {
    if (line.startsWith("a=candidate:") || line === "a=end-of-candidates") continue;
    if (line.startsWith("a=ice-ufrag:") && ufrag) out.push(ufrag);
    else if (line.startsWith("a=ice-pwd:") && pwd) out.push(pwd);
    else if (line) out.push(line);
    // Bundled: the first m-line carries the candidates.
    if (line.startsWith("a=mid:") && first) {
      out.push(...candidates, "a=end-of-candidates");
      first = false;
    }
  }
  return out.join("\r\n") + "\r\n";
}

/// ICE restart on the same session: the recording, the viewers and the directives carry on.
async function restartIce() {
  const { pc, resource } = state;
  if (!pc || !resource) throw new Error("not publishing");
  state.restarts = (state.restarts ?? 0) + 1;
  await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
  await gathered(pc);
  const res = await fetch(resource, {
    method: "PATCH",
    headers: { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*",
      Authorization: `Bearer ${state.token}` },
    body: restartFragment(pc.localDescription.sdp),
  });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`ICE restart: ${res.status} ${text}`);
  state.etag = res.headers.get("ETag");
  await pc.setRemoteDescription({ type: "answer", sdp: patchedAnswer(pc.remoteDescription.sdp, text) });
}

/// After a network change or a failed path: restart ICE, else publish anew.
async function recover() {
  if (state.stopped || state.recovering) return;
  state.recovering = true;
  try {
    await restartIce();
    show("ICE restarted");
  } catch (e) {
    fail(e.message);
    republish();
  } finally {
    state.recovering = false;
  }
}

async function unpublish() {
  const { pc, resource } = state;
  state.pc = null;
  state.resource = null;
  pc?.close();
  if (resource) {
    await fetch(resource, { method: "DELETE", headers: { Authorization: `Bearer ${state.token}` } })
      .catch(() => {});
  }
}

/// Publishes again after a failure or a network change, with growing waits.
async function republish() {
  if (state.stopped) return;
  await unpublish();
  const wait = Math.min(10000, 500 * 2 ** state.retry) * (0.5 + Math.random() / 2);
  state.retry += 1;
  show(`reconnecting in ${(wait / 1000).toFixed(1)} s`);
  setTimeout(async () => {
    try {
      await publish();
      state.retry = 0;
      fail("");
    } catch (e) {
      fail(`publishing: ${e.message}`);
      republish();
    }
  }, wait);
}

function send(message) {
  if (state.ws?.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function ack(directive, stateName, ok, message) {
  send({ ack: { directiveId: directive.id, ok, message, state: stateName, unitId: state.unit } });
}

function connectControl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/api/unit`);
  state.ws = ws;
  ws.onopen = () => send({ hello: { unitId: state.unit, token: state.token, role: "ROLE_PUBLISHER" } });
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.directive) onDirective(msg.directive);
    if (msg.talkback) {
      $("talk").textContent = msg.talkback.on ? `Command centre speaking (${msg.talkback.by})` : "";
    }
  };
  ws.onclose = (e) => {
    if (state.stopped) return;
    if (e.reason) fail(`control: ${e.reason}`);
    setTimeout(connectControl, 2000);
  };
}

/// What the app can do of each directive, and its honest answer when it cannot.
async function act(d) {
  const video = state.pc?.getSenders().find((s) => s.track?.kind === "video" || s.track === null);
  switch (d.kind) {
    case "DIRECTIVE_KIND_MESSAGE":
      return null; // waits for the officer's acknowledgement
    case "DIRECTIVE_KIND_QUALITY": {
      if (!video) return [false, "not publishing"];
      const p = video.getParameters();
      p.encodings ??= [{}];
      if (d.bitrate) p.encodings[0].maxBitrate = d.bitrate * 1000;
      const h = state.stream.getVideoTracks()[0]?.getSettings().height ?? 0;
      if (d.height && h) p.encodings[0].scaleResolutionDownBy = Math.max(1, h / d.height);
      await video.setParameters(p);
      return [true, `max ${d.bitrate ?? "-"} kbit/s, height ${d.height ?? "kept"}`];
    }
    case "DIRECTIVE_KIND_STOP_LIVE":
      await video?.replaceTrack(null);
      return [true, "live video stopped"];
    case "DIRECTIVE_KIND_GO_LIVE":
      await video?.replaceTrack(state.stream.getVideoTracks()[0] ?? null);
      return [true, "live video on"];
    case "DIRECTIVE_KIND_MARK":
      localStorage.setItem(`mark-${d.id}`, JSON.stringify({ text: d.text, at: Date.now() }));
      return [true, `mark kept on the phone: ${d.text}`];
    default:
      return [false, `${d.kind} is not supported by the officer app`];
  }
}

async function onDirective(d) {
  if (state.seen.has(d.id)) {
    // Sent again (at least once): answered, never done twice.
    const known = state.directives.get(d.id);
    ack(d, known?.state ?? "DIRECTIVE_STATE_DELIVERED", true, known?.message ?? "");
    return;
  }
  state.seen.add(d.id);
  ack(d, "DIRECTIVE_STATE_DELIVERED", true, "");
  const record = { ...d, state: "DIRECTIVE_STATE_DELIVERED", message: "" };
  state.directives.set(d.id, record);
  render();
  const outcome = await act(d).catch((e) => [false, e.message]);
  if (outcome) {
    const [ok, message] = outcome;
    record.state = ok ? "DIRECTIVE_STATE_DONE" : "DIRECTIVE_STATE_FAILED";
    record.message = message;
    ack(d, record.state, ok, message);
    render();
  }
}

function acknowledge(id) {
  const d = state.directives.get(id);
  if (!d || d.state !== "DIRECTIVE_STATE_DELIVERED") return;
  ack(d, "DIRECTIVE_STATE_ACKNOWLEDGED", true, "read by the officer");
  d.state = "DIRECTIVE_STATE_DONE";
  d.message = "acknowledged by the officer";
  ack(d, d.state, true, d.message);
  render();
}

function render() {
  const ul = $("directives");
  ul.replaceChildren(...[...state.directives.values()].reverse().map((d) => {
    const li = document.createElement("li");
    li.dataset.id = d.id;
    const what = d.kind === "DIRECTIVE_KIND_MESSAGE" ? d.text : d.kind.replace("DIRECTIVE_KIND_", "");
    li.textContent = `${what} — ${d.issuedBy ?? ""} · ${d.state.replace("DIRECTIVE_STATE_", "").toLowerCase()}`;
    if (d.kind === "DIRECTIVE_KIND_MESSAGE" && d.state === "DIRECTIVE_STATE_DELIVERED") {
      const b = document.createElement("button");
      b.textContent = "Acknowledge";
      b.className = "ack";
      b.onclick = () => acknowledge(d.id);
      li.append(" ", b);
    }
    return li;
  }));
}

function telemetry() {
  const p = state.position;
  const message = {
    timestampUs: String(Date.now() * 1000),
    batteryPercent: state.battery == null ? 0 : state.battery * 100,
    recording: Boolean(state.pc),
    sos: Date.now() < state.sosUntil,
  };
  if (p) {
    message.position = {
      latitude: p.latitude, longitude: p.longitude, accuracyM: p.accuracy ?? 0,
      speedMps: p.speed ?? 0, headingDeg: p.heading ?? 0,
    };
    $("where").textContent = `${p.latitude.toFixed(5)}, ${p.longitude.toFixed(5)} ±${Math.round(p.accuracy ?? 0)} m`;
  }
  send({ telemetry: message });
}

async function start(token) {
  state.token = token;
  state.unit = unitOf(token);
  if (!state.unit) return fail("this is not a device token");
  $("unit-id").textContent = state.unit;
  $("signin").hidden = true;
  $("unit").hidden = false;
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment" }, audio: true });
  } catch (e) {
    return fail(`camera/microphone: ${e.message}`);
  }
  $("preview").srcObject = state.stream;
  navigator.geolocation?.watchPosition((pos) => { state.position = pos.coords; },
    (e) => fail(`position: ${e.message}`), { enableHighAccuracy: true });
  navigator.getBattery?.().then((b) => {
    state.battery = b.level;
    b.onlevelchange = () => { state.battery = b.level; };
  }).catch(() => {});
  connectControl();
  setInterval(telemetry, TELEMETRY_MS);
  try {
    await publish();
    show("publishing");
  } catch (e) {
    fail(`publishing: ${e.message}`);
    republish();
  }
  // A new network (Wi-Fi ↔ mobile): restart ICE on it.
  window.addEventListener("online", () => recover());
  navigator.connection?.addEventListener?.("change", () => recover());
  navigator.serviceWorker?.register("officer-sw.js").catch(() => {});
}

$("signin").onsubmit = (e) => {
  e.preventDefault();
  start($("token").value.trim());
};

$("sos").onclick = () => {
  state.sosUntil = Date.now() + SOS_MS;
  $("sos").setAttribute("aria-pressed", "true");
  telemetry();
  setTimeout(() => $("sos").setAttribute("aria-pressed", "false"), SOS_MS);
};

window.officer = { state, acknowledge, restartIce };
