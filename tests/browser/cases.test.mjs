// Recorded playback in a real browser: the demo hub records its units as 4 s fMP4 segments
// bound to the demo case; the console's Cases view lists the case, draws each unit's
// timeline and plays a recording through Media Source Extensions, seeking on the timeline. A
// file damaged on disk is refused by the hub (409), shown as damaged, and skipped.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { artifacts, browser, startDemo, waitFor } from "./harness.mjs";

const CASE = "(2026)京0113执1234号";
// The simulated units send 30 frames a second: one frame of slack per segment.
const FRAME = 1 / 30;
// Each step below has its own bound; this one catches anything left waiting.
const BOUNDED = { timeout: 120000 };

let demo;
let chrome;

before(async () => {
  demo = await startDemo(2);
  chrome = await browser();
});

after(async () => {
  await chrome?.close();
  await demo?.stop();
});

async function api(url, token = demo.token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const res = await fetch(`${demo.base}${url}`, { headers, signal: AbortSignal.timeout(10000) });
  const type = res.headers.get("content-type") ?? "";
  const body = type.includes("json") ? await res.json() : await res.arrayBuffer();
  return { status: res.status, body };
}

const listing = () => api(`/api/recordings?case=${encodeURIComponent(CASE)}`);

/// The case's recording of `unit` once it has at least `n` segments.
async function recordingWith(unit, n) {
  return waitFor(`${n} segments of ${unit}`, 40000, async () => {
    const { status, body } = await listing();
    const rec = status === 200 ? body.recordings?.find((r) => r.unit === unit) : null;
    return rec?.segments?.length >= n ? rec : null;
  });
}

async function openCase() {
  const page = await chrome.context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${demo.base}/`);
  await page.fill("#token", demo.token);
  await page.click("#signin-form button");
  await page.waitForSelector("#units li.online", { timeout: 5000 });
  // By keyboard: "c" opens the Cases view with the focus on the first case; Enter opens it.
  await page.keyboard.press("c");
  await page.waitForFunction(() => document.activeElement?.classList.contains("case"), null,
    { timeout: 5000 });
  assert.equal(await page.evaluate(() => document.activeElement.dataset.number), CASE);
  await page.keyboard.press("Enter");
  await page.waitForSelector('.tl-row[data-unit="sim-1"] .tl-seg', { timeout: 5000 });
  assert.ok(await page.isHidden("#wall"));
  return { page, errors };
}

const state = (page) => page.evaluate(() => window.tianwang.cases.state());

test("recordings need a token", BOUNDED, async () => {
  const rec = await recordingWith("sim-1", 1);
  for (const url of [`/api/recordings?case=${encodeURIComponent(CASE)}`, "/api/cases",
    rec.initUrl, rec.segments[0].url]) {
    const { status, body } = await api(url, null);
    assert.equal(status, 401, url);
    assert.match(body.error, /Bearer/, url);
  }
  assert.equal((await api(rec.initUrl, "not-a-token")).status, 401);
  assert.equal((await api(rec.initUrl)).status, 200);
});

test("a case's recording plays through MSE and seeks on the timeline", BOUNDED, async () => {
  const listed = await recordingWith("sim-1", 3);
  const { page, errors } = await openCase();
  const opened = await state(page);
  assert.equal(opened.caseNumber, CASE);
  assert.deepEqual(opened.units, ["sim-1", "sim-2"]);
  assert.equal(await page.locator("#operations tbody tr").count(), 1);

  await page.click('.tl-row[data-unit="sim-1"] .play');
  // Every listed segment in the buffer (they are all within the player's minute ahead).
  const loaded = await waitFor("all segments buffered", 15000, async () => {
    const s = await state(page);
    return s.player?.segments.length >= 3 && s.player.segments.every((x) => x.loaded) ? s : null;
  });
  const p = loaded.player;
  assert.equal(p.unit, "sim-1");
  assert.equal(p.recording, listed.recording);
  assert.match(p.mime, /^video\/mp4; codecs="avc1\.[0-9a-f]{6},opus"$/i);
  const segs = p.segments;
  const total = segs.reduce((sum, x) => sum + (x.t1 - x.t0), 0);
  assert.equal(p.buffered.length, 1, `one contiguous range: ${JSON.stringify(p.buffered)}`);
  const [from, to] = p.buffered[0];
  const slack = segs.length * FRAME;
  assert.ok(Math.abs(from - segs[0].t0) <= FRAME, `buffer starts at ${from}, not ${segs[0].t0}`);
  assert.ok(Math.abs(to - from - total) <= slack,
    `buffered ${(to - from).toFixed(3)} s for ${segs.length} segments of ${total.toFixed(3)} s`);
  // The segments are back to back on the media timeline.
  for (let i = 1; i < segs.length; i++) assert.ok(Math.abs(segs[i].t0 - segs[i - 1].t1) < 1e-6);

  // It plays: the clock moves and the picture has a size.
  const t0 = (await state(page)).player.currentTime;
  const playing = await waitFor("currentTime advancing", 5000, async () => {
    const s = (await state(page)).player;
    return s.currentTime > t0 + 0.5 && !s.paused ? s : null;
  });
  assert.ok(playing.videoWidth > 0, `videoWidth ${playing.videoWidth}`);
  assert.ok(playing.wallUs >= Number(listed.segments[0].startUs));

  // A click on the timeline 1.5 s into the 2nd segment lands there and plays on.
  const second = segs[1];
  const atUs = second.startUs + 1_500_000;
  const target = second.t0 + 1.5;
  const { span } = await state(page);
  const box = await page.locator('.tl-row[data-unit="sim-1"] .tl-bar').boundingBox();
  const x = box.x + (box.width * (atUs - span.startUs)) / (span.endUs - span.startUs);
  await page.mouse.click(x, box.y + box.height / 2);
  const seeked = await waitFor("seek done", 5000, async () => {
    const s = (await state(page)).player;
    return s.lastSeek?.landed != null && !s.seeking ? s : null;
  });
  // One pixel of the bar is a few ms of the case: the click aims within 0.1 s.
  assert.ok(Math.abs(seeked.lastSeek.target - target) < 0.1,
    `clicked ${seeked.lastSeek.target}, meant ${target}`);
  assert.ok(Math.abs(seeked.lastSeek.landed - target) < 0.5,
    `landed at ${seeked.lastSeek.landed}, target ${target}`);
  const after = await waitFor("playing on after the seek", 5000, async () => {
    const s = (await state(page)).player;
    return s.currentTime > seeked.lastSeek.landed + 0.5 && !s.paused ? s : null;
  });
  const wall = after.wallUs;
  assert.ok(wall > atUs && wall < second.endUs + 2_000_000, `wall clock ${wall} after ${atUs}`);

  // The video's own seek bar (currentTime) back into the 1st segment also works.
  await page.evaluate(() => { window.tianwang.cases.video.currentTime = 1; });
  await waitFor("seek back", 5000, async () => {
    const s = (await state(page)).player;
    return !s.seeking && s.currentTime > 1.2 && s.currentTime < 3.5 && !s.paused;
  });

  fs.mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, "case-playback.png") });
  const end = await state(page);
  assert.deepEqual(end.errors, []);
  assert.deepEqual(end.player.errors, []);
  assert.equal(end.player.mediaError, null);
  assert.deepEqual(end.player.bad, {});
  assert.ok(end.player.videoWidth > 0);
  assert.deepEqual(errors, []);
  console.log(JSON.stringify({
    segments: segs.length,
    media_s: Number(total.toFixed(3)),
    buffered: p.buffered,
    seek_target: Number(target.toFixed(3)),
    landed: Number(seeked.lastSeek.landed.toFixed(3)),
    fetches: end.player.fetches,
    hash_checked: end.player.verified,
  }));
  await page.close();
});

test("a damaged file is refused with 409, shown as damaged, and skipped", BOUNDED, async () => {
  const rec = await recordingWith("sim-2", 3);
  const bad = rec.segments[1];
  // Flip bytes inside the 2nd segment's file, as a failing disk would; same size.
  const rel = decodeURIComponent(bad.url.replace(/^\/recordings\//, ""));
  const file = path.join(demo.data, "recordings", rel);
  const fd = fs.openSync(file, "r+");
  fs.writeSync(fd, Buffer.alloc(64, 0x5a), 0, 64, 4096);
  fs.closeSync(fd);
  const refused = await api(bad.url);
  assert.equal(refused.status, 409);
  assert.match(refused.body.error, /damaged/);

  const { page, errors } = await openCase();
  await page.click('.tl-row[data-unit="sim-2"] .play');
  await waitFor("the damaged segment reported", 10000, async () =>
    (await state(page)).player?.bad[bad.number] !== undefined);
  const banner = page.locator("#case-error.damaged");
  assert.match(await banner.innerText(), new RegExp(`segment ${bad.number} .*DAMAGED`));
  assert.ok(await page.locator('.tl-row[data-unit="sim-2"] .tl-bad').isVisible());
  // Playback runs through the 1st segment and carries on after the hole.
  const third = (await state(page)).player.segments[2];
  await waitFor("playing past the damaged segment", 12000, async () => {
    const s = (await state(page)).player;
    return s.currentTime > third.t0 + 0.3 && !s.paused;
  }).catch(async (e) => {
    const s = (await state(page)).player;
    delete s.segments;
    throw new Error(`${e.message}: ${JSON.stringify(s)}`);
  });
  const s = await state(page);
  assert.equal(s.player.mediaError, null);
  assert.deepEqual(s.player.errors, []);
  assert.deepEqual(errors, []);
  fs.mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, "case-damaged.png") });
  await page.close();
});
