// WHIP ingest in a real browser, against `hub demo`: a page with Chromium's fake camera and
// microphone publishes unit officer-1 over WHIP (RFC 9725) with a device token; a console
// page watches officer-1 on a tile and decodes its video; the hub records it like any
// unit. Refusals: a token for another unit, a second publisher of a live unit, an offer
// without H.264, a body that is not SDP.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { browser, decodedByTile, root, startDemo, waitFor } from "./harness.mjs";

const run = promisify(execFile);
const hubBin = path.join(root, "target", "debug", "hub");

async function deviceToken(demo, unit) {
  const { stdout } = await run(hubBin, ["token", "issue", "--data", demo.data, "--role", "device",
    "--subject", unit, "--ttl", "1h"]);
  return stdout.trim();
}

/// Publishes from a page: camera and microphone, H.264 preferred, all candidates in the
/// offer (no trickle), POST to /whip/{unit}. Returns the HTTP status and the resource.
async function publish(page, unit, token, { video = true, codec = "H264" } = {}) {
  return page.evaluate(async ({ unit, token, video, codec }) => {
    const stream = await navigator.mediaDevices.getUserMedia({ video, audio: true });
    const pc = new RTCPeerConnection();
    for (const track of stream.getTracks()) {
      const t = pc.addTransceiver(track, { direction: "sendonly" });
      if (track.kind === "video") {
        const wanted = RTCRtpSender.getCapabilities("video").codecs
          .filter((c) => codec === "VP8" ? c.mimeType === "video/VP8"
            : c.mimeType === "video/H264" && /packetization-mode=1/.test(c.sdpFmtpLine ?? "")
              && /profile-level-id=42/.test(c.sdpFmtpLine ?? ""));
        t.setCodecPreferences(wanted);
      }
    }
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
      setTimeout(resolve, 3000);
    });
    const res = await fetch(`/whip/${unit}`, {
      method: "POST",
      headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${token}` },
      body: pc.localDescription.sdp,
    });
    const text = await res.text();
    if (res.status === 201) await pc.setRemoteDescription({ type: "answer", sdp: text });
    window.whip = { pc, location: res.headers.get("Location") };
    return { status: res.status, text, location: res.headers.get("Location") };
  }, { unit, token, video, codec });
}

/// A unit's recording, fetched back through the hub (hash-checked) into one MP4 file;
/// ffprobe's streams of it.
async function recorded(demo, unit) {
  const auth = { headers: { Authorization: `Bearer ${demo.token}` } };
  const rec = await waitFor(`${unit}'s recording`, 30000, async () => {
    const body = await (await fetch(`${demo.base}/api/recordings?unit=${unit}`, auth)).json();
    const r = (body.recordings ?? []).find((x) => (x.segments ?? []).length >= 1);
    return r ?? null;
  });
  const parts = [rec.initUrl, ...rec.segments.map((x) => x.url)];
  const bytes = [];
  for (const url of parts) {
    const res = await fetch(`${demo.base}${url}`, auth);
    assert.equal(res.status, 200, url);
    bytes.push(Buffer.from(await res.arrayBuffer()));
  }
  const mp4 = path.join(demo.data, `${unit}.mp4`);
  fs.writeFileSync(mp4, Buffer.concat(bytes));
  const { stdout } = await run("ffprobe", ["-v", "error", "-count_frames", "-show_entries",
    "stream=codec_name,nb_read_frames", "-of", "json", mp4]);
  return JSON.parse(stdout).streams;
}

describe("WHIP", () => {
  let demo;
  let chrome;

  before(async () => {
    demo = await startDemo(1);
    chrome = await browser({ media: true });
  });

  after(async () => {
    await chrome?.close();
    await demo?.stop();
  });

  test("a browser publishes officer-1; a console decodes it; the hub records it", async () => {
    const token = await deviceToken(demo, "officer-1");
    const phone = await chrome.context.newPage();
    await phone.goto(`${demo.base}/`);
    const answer = await publish(phone, "officer-1", token);
    assert.equal(answer.status, 201, answer.text);
    assert.match(answer.location, /^\/whip\/officer-1\/[0-9a-f]+$/);
    await waitFor("officer-1 online", 15000, async () =>
      (await demo.metrics()).tianwang_units_online === 2);

    const console_ = await chrome.context.newPage();
    await console_.goto(`${demo.base}/`);
    await console_.fill("#token", demo.token);
    await console_.click("#signin-form button");
    await console_.waitForSelector("#court-tree li.unit.online", { timeout: 10000 });
    await console_.evaluate(() => window.tianwang.wall.assign(0, "officer-1"));
    const decoded = await waitFor("officer-1 decoded on the wall", 30000, async () => {
      const d = await decodedByTile(console_);
      return Object.values(d).some((n) => n > 30) ? d : null;
    });
    assert.ok(decoded);

    // A second publisher of the live unit is refused; so are a wrong token and bad offers.
    const again = await publish(await chrome.context.newPage().then(async (p) => {
      await p.goto(`${demo.base}/`);
      return p;
    }), "officer-1", token);
    assert.equal(again.status, 409, again.text);
    const other = await publish(phone, "officer-2", token);
    assert.equal(other.status, 403, other.text);
    assert.match(other.text, /not "officer-2"/);
    const audioOnly = await publish(phone, "officer-1", token, { video: false });
    assert.equal(audioOnly.status, 406, audioOnly.text);
    const notSdp = await phone.evaluate(async (token) => (await fetch("/whip/officer-1", {
      method: "POST", headers: { "Content-Type": "text/plain", Authorization: `Bearer ${token}` },
      body: "hello" })).status, token);
    assert.equal(notSdp, 415);

    // DELETE ends it: the unit goes offline.
    const del = await phone.evaluate(async ({ token, location }) =>
      (await fetch(location, { method: "DELETE",
        headers: { Authorization: `Bearer ${token}` } })).status, { token, location: answer.location });
    assert.equal(del, 200);
    await waitFor("officer-1 offline", 15000, async () =>
      (await demo.metrics()).tianwang_units_online === 1);

    // Recorded like any unit: the init and media segments decode as one H.264 (+ Opus) MP4.
    const streams = await recorded(demo, "officer-1");
    const h264 = streams.find((x) => x.codec_name === "h264");
    assert.ok(h264 && Number(h264.nb_read_frames) > 30, JSON.stringify(streams));
    assert.ok(streams.some((x) => x.codec_name === "opus"), JSON.stringify(streams));
  });

  test("a VP8 publisher is relayed to the wall and recorded as VP8", async () => {
    const token = await deviceToken(demo, "officer-2");
    const phone = await chrome.context.newPage();
    await phone.goto(`${demo.base}/`);
    const answer = await publish(phone, "officer-2", token, { codec: "VP8" });
    assert.equal(answer.status, 201, answer.text);
    assert.match(answer.text, /VP8\/90000/);
    assert.doesNotMatch(answer.text, /H264/);

    const console_ = await chrome.context.newPage();
    await console_.goto(`${demo.base}/`);
    await console_.fill("#token", demo.token);
    await console_.click("#signin-form button");
    await console_.waitForSelector("#court-tree li.unit.online", { timeout: 10000 });
    await console_.evaluate(() => window.tianwang.wall.assign(0, "officer-2"));
    await waitFor("officer-2 decoded on the wall", 30000, async () => {
      const d = await decodedByTile(console_);
      return Object.values(d).some((n) => n > 30) ? d : null;
    });
    // The wall's decoder is VP8: nothing was transcoded.
    const mime = await console_.evaluate(async () => {
      let m = "";
      (await window.tianwang.session.pc.getStats()).forEach((r) => {
        if (r.type === "codec" && /video/.test(r.mimeType) && r.payloadType) m += `${r.mimeType} `;
      });
      return m;
    });
    assert.match(mime, /VP8/);
    await phone.evaluate(async ({ token, location }) => fetch(location, { method: "DELETE",
      headers: { Authorization: `Bearer ${token}` } }), { token, location: answer.location });
    const streams = await recorded(demo, "officer-2");
    const vp8 = streams.find((x) => x.codec_name === "vp8");
    assert.ok(vp8 && Number(vp8.nb_read_frames) > 30, JSON.stringify(streams));
    assert.ok(streams.some((x) => x.codec_name === "opus"), JSON.stringify(streams));
    const { stdout } = await run(hubBin, ["verify", "--data", demo.data, "--unit", "officer-2"]);
    assert.match(stdout, /^OK .*1 unit\(s\), [1-9]\d* segment/m, stdout);
  });
});
