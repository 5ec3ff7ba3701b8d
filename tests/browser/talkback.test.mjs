// Talkback in a real browser, against `hub demo`: an official holds the talk button in
// sim-1's directives panel; Chromium's fake microphone goes over the console's WebRTC
// session to the hub and on over QUIC to the simulated unit, which keeps it as an Ogg Opus
// file (and the delay it measured). The file must decode, not be silent, and carry the fake
// microphone's 400 Hz tone. A commander's press is refused with the reason. A video link
// sends Chromium's fake camera as well: the unit keeps it as a Matroska file, the official
// sees the unit enlarged, and the hub records the official's side with the case.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { artifacts, browser, root, sleep, startDemo, waitFor } from "./harness.mjs";

const run = promisify(execFile);
const hubBin = path.join(root, "target", "debug", "hub");
/// The demo's case (hub demo opens it with an operation of sim-1 and sim-2).
const CASE = "(2026)京0113执1234号";
const talkLog = (page) => page.evaluate(() => window.tianwang.directives.talkLog);

async function signIn(chrome, base, token) {
  const page = await chrome.context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${base}/`);
  await page.fill("#token", token);
  await page.click("#signin-form button");
  await page.waitForSelector("#court-tree li.unit.online", { timeout: 10000 });
  await page.evaluate(() => window.tianwang.directives.open("sim-1"));
  return { page, errors };
}

/// Chromium's fake audio capture device beeps at this pitch (its FakeAudioInputStream).
const FAKE_TONE_HZ = 400;

/// The pitch of a recording's loud parts: ffmpeg decodes to 48 kHz mono; 10 ms windows
/// above a tenth of the peak level are kept, and a Goertzel filter scans 100–4000 Hz in 10 Hz
/// steps for the strongest.
async function dominantHz(file) {
  const { stdout } = await run("ffmpeg", ["-hide_banner", "-loglevel", "error", "-i", file,
    "-ac", "1", "-ar", "48000", "-f", "s16le", "-"], { encoding: "buffer", maxBuffer: 1 << 26 });
  const pcm = new Int16Array(stdout.buffer, stdout.byteOffset, Math.floor(stdout.length / 2));
  let peak = 0;
  for (const v of pcm) peak = Math.max(peak, Math.abs(v));
  const loud = [];
  for (let w = 0; w + 480 <= pcm.length && loud.length < 24000; w += 480) {
    let level = 0;
    for (let i = w; i < w + 480; i++) level += Math.abs(pcm[i]);
    if (level / 480 >= peak / 10) for (let i = w; i < w + 480; i++) loud.push(pcm[i]);
  }
  let best = [0, 0];
  for (let f = 100; f <= 4000; f += 10) {
    const k = 2 * Math.cos((2 * Math.PI * f) / 48000);
    let s1 = 0;
    let s2 = 0;
    for (const x of loud) {
      const s0 = x + k * s1 - s2;
      s2 = s1;
      s1 = s0;
    }
    const power = s1 * s1 + s2 * s2 - k * s1 * s2;
    if (power > best[1]) best = [f, power];
  }
  return best[0];
}

/// The newest record of the unit's talkback log, once it has one.
function lastTalk(file) {
  if (!fs.existsSync(file)) return null;
  const lines = fs.readFileSync(file, "utf8").trim().split("\n").filter(Boolean);
  return lines.length ? JSON.parse(lines[lines.length - 1]) : null;
}

describe("talkback", () => {
  let demo;
  let chrome;

  before(async () => {
    demo = await startDemo(2);
    chrome = await browser({ media: true });
  });

  after(async () => {
    await chrome?.close();
    await demo?.stop();
  });

  test("an official holds to talk: the unit keeps what was said, not silent", async () => {
    const { page, errors } = await signIn(chrome, demo.base, demo.env.TIANWANG_OFFICIAL_TOKEN);
    const button = page.locator("#talk-button");
    await button.hover();
    await page.mouse.down();
    await waitFor("the talk live", 15000, async () =>
      (await talkLog(page)).some((t) => t.state === "live"));
    // The browser really sends: its outbound audio on the talk line grows.
    await waitFor("microphone packets sent", 10000, () => page.evaluate(async () => {
      let sent = 0;
      (await window.tianwang.session.pc.getStats()).forEach((r) => {
        if (r.type === "outbound-rtp" && r.kind === "audio") sent += r.packetsSent ?? 0;
      });
      return sent > 100;
    }));
    await sleep(1500);
    await page.mouse.up();
    await waitFor("the talk stopped", 10000, async () =>
      (await talkLog(page)).some((t) => t.state === "stopped"));

    const log = path.join(demo.data, "agents", "sim-1", "talkback.jsonl");
    const rec = await waitFor("the unit's talkback record", 15000, () => lastTalk(log));
    assert.ok(rec.frames >= 50, `only ${rec.frames} frames reached the unit`);
    assert.ok(fs.existsSync(rec.file) || fs.existsSync(path.join(demo.data, "agents", "sim-1",
      rec.file)), `no file ${rec.file}`);
    const file = fs.existsSync(rec.file) ? rec.file : path.join(demo.data, "agents", "sim-1", rec.file);
    const { stderr } = await run("ffmpeg", ["-hide_banner", "-nostats", "-i", file, "-af",
      "volumedetect", "-f", "null", "-"]);
    const max = Number(/max_volume: (-?[\d.]+) dB/.exec(stderr)?.[1] ?? "-inf");
    assert.ok(max > -50, `the talk is silent (max ${max} dB)`);
    // And it is the fake microphone's tone: the pitch of its loud parts.
    const tone = await dominantHz(file);
    console.log(`talkback: the unit heard a ${tone.toFixed(0)} Hz tone`);
    assert.ok(Math.abs(tone - FAKE_TONE_HZ) <= 20, `heard ${tone} Hz, not the ${FAKE_TONE_HZ} Hz tone`);
    const pressed = (await talkLog(page)).find((t) => t.state === "pressed").at;
    console.log(`talkback: press → first audio at the unit ${(rec.first_frame_us / 1000 - pressed)
      .toFixed(0)} ms; hub → unit delay p50 ${rec.delay_p50_ms} ms p95 ${rec.delay_p95_ms} ms; `
      + `${rec.frames} frames`);

    // A second press: the talk line and the connection are there, only the talk starts.
    const before = (await talkLog(page)).length;
    await page.mouse.down();
    await waitFor("the second talk live", 15000, async () =>
      (await talkLog(page)).slice(before).some((t) => t.state === "live"));
    await sleep(1500);
    await page.mouse.up();
    const second = await waitFor("the second talk's record", 15000, () => {
      const r = lastTalk(log);
      return r && r.talk_id !== rec.talk_id ? r : null;
    });
    const pressedAgain = (await talkLog(page)).slice(before).find((t) => t.state === "pressed").at;
    console.log(`talkback, second press: press → first audio at the unit ${
      (second.first_frame_us / 1000 - pressedAgain).toFixed(0)} ms; ${second.frames} frames`);
    assert.ok(second.frames >= 25, `only ${second.frames} frames in the second talk`);
    assert.deepEqual(errors, []);
  });

  test("an official's video link: the unit shows the camera, the official sees the unit, "
    + "both sides recorded and audited with the case", async () => {
    const { page, errors } = await signIn(chrome, demo.base, demo.env.TIANWANG_OFFICIAL_TOKEN);
    const before = (await talkLog(page)).length;
    await page.click("#link-button");
    await waitFor("the link live", 15000, async () =>
      (await talkLog(page)).slice(before).some((t) => t.state === "live" && t.video));
    // The unit fills the official's screen: its tile enlarged, playing, with sound.
    await waitFor("the unit's picture enlarged", 15000, () => page.evaluate(() => {
      const big = document.querySelector("#wall.enlarged .tile.big video");
      return !!big && big.videoWidth > 0 && !big.paused && !big.muted;
    }));
    // The official sees their own camera, and the browser really sends it (H.264 first).
    assert.ok(await page.evaluate(() => !document.querySelector("#link-self").hidden
      && document.querySelector("#link-self-video").srcObject?.getVideoTracks().length === 1));
    await waitFor("camera frames sent", 15000, () => page.evaluate(async () => {
      let frames = 0;
      (await window.tianwang.session.pc.getStats()).forEach((r) => {
        if (r.type === "outbound-rtp" && r.kind === "video") frames += r.framesEncoded ?? 0;
      });
      return frames > 60;
    }));
    await sleep(3000);
    await page.screenshot({ path: path.join(artifacts, "video-link.png") });
    await page.click("#link-end");
    await waitFor("the link stopped", 10000, async () =>
      (await talkLog(page)).slice(before).some((t) => t.state === "stopped"));
    assert.ok(await page.evaluate(() => document.querySelector("#link-self").hidden));

    // The unit showed the official's camera and kept it: a Matroska file that decodes at
    // the fake camera's size, and the microphone's tone beside it.
    const agent = path.join(demo.data, "agents", "sim-1");
    const rec = await waitFor("the unit's link record", 15000, () => {
      const r = lastTalk(path.join(agent, "talkback.jsonl"));
      return r && r.video_file ? r : null;
    });
    console.log(`video link: ${rec.video_frames} frames (${rec.video_codec}) at the unit, hub → unit `
      + `delay p50 ${rec.video_delay_p50_ms} ms p95 ${rec.video_delay_p95_ms} ms; ${rec.frames} audio frames`);
    assert.equal(rec.error, null);
    assert.ok(rec.video_frames >= 60, `only ${rec.video_frames} frames of the camera reached the unit; `
      + `the demo's log of it:\n${demo.log().split("\n").filter((l) => /link|talk|keyframe/i.test(l))
        .slice(-40).join("\n")}`);
    const { stdout } = await run("ffprobe", ["-v", "error", "-count_frames", "-show_entries",
      "stream=codec_name,width,height,nb_read_frames", "-of", "json", path.join(agent, rec.video_file)]);
    const [video] = JSON.parse(stdout).streams;
    assert.equal(video.codec_name, rec.video_codec === "vp8" ? "vp8" : "h264");
    assert.deepEqual([video.width, video.height], [640, 480]);
    assert.ok(Number(video.nb_read_frames) >= 60, JSON.stringify(video));
    const tone = await dominantHz(path.join(agent, rec.file));
    assert.ok(Math.abs(tone - FAKE_TONE_HZ) <= 20, `heard ${tone} Hz, not the ${FAKE_TONE_HZ} Hz tone`);

    // The hub recorded the official's side bound to the demo case, and the case's export
    // carries both sides and the link's audit entries.
    const out = path.join(demo.data, "export-link");
    const exported = await waitFor("the official's side in the case export", 30000, async () => {
      fs.rmSync(out, { recursive: true, force: true });
      await run(hubBin, ["export", "--data", demo.data, "--case", CASE, "--out", out]);
      const m = JSON.parse(fs.readFileSync(path.join(out, "manifest.json"), "utf8"));
      return m.files.some((f) => f.unit === "sim-1~official") ? m : null;
    });
    assert.ok(exported.files.some((f) => f.unit === "sim-1"), "the unit's own side is exported");
    const official = exported.files.find((f) => f.unit === "sim-1~official");
    const probe = await run("ffprobe", ["-v", "error", "-count_frames", "-show_entries",
      "stream=codec_type,codec_name,width,height,nb_read_frames", "-of", "json", path.join(out, official.name)]);
    const streams = JSON.parse(probe.stdout).streams;
    const hubVideo = streams.find((x) => x.codec_type === "video" || x.width);
    assert.ok(hubVideo && Number(hubVideo.nb_read_frames) >= 30, JSON.stringify(streams));
    assert.ok(streams.some((x) => x.codec_name === "opus"), JSON.stringify(streams));
    const actions = exported.audit.map((a) => a.action);
    assert.ok(actions.includes("link.start") && actions.includes("link.end"), actions.join(" "));
    const verified = await run(hubBin, ["verify", "--data", demo.data, "--unit", "sim-1~official"]);
    assert.match(verified.stdout, /^OK .*1 unit\(s\), [1-9]\d* segment/m, verified.stdout);
    assert.deepEqual(errors, []);
  });

  test("a commander cannot open a video link, nor talk", async () => {
    const { page } = await signIn(chrome, demo.base, demo.token);
    await page.click("#link-button");
    const refused = await waitFor("the link's refusal", 10000, async () =>
      (await talkLog(page)).find((t) => t.state === "refused" && t.video));
    assert.match(refused.reason, /cannot open a video link/);
    assert.match(await page.innerText("#talk-state"), /no video link with sim-1/);
    assert.equal(await page.getAttribute("#link-button", "aria-pressed"), "false");
  });

  test("a commander's press is refused with the reason", async () => {
    const { page } = await signIn(chrome, demo.base, demo.token);
    await page.locator("#talk-button").hover();
    await page.mouse.down();
    const refused = await waitFor("the refusal", 10000, async () =>
      (await talkLog(page)).find((t) => t.state === "refused"));
    await page.mouse.up();
    assert.match(refused.reason, /cannot talk/);
    assert.match(await page.innerText("#talk-state"), /cannot talk to sim-1/);
  });
});
