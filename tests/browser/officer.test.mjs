// The officer app in a real browser, against `hub demo`: a phone page (Chromium's fake
// camera and microphone, a faked position) signs in with officer-1's device token at
// /officer, publishes over WHIP and reports telemetry over its control session. The hub
// stores the faked position, the SOS button raises an alarm, and a console's instruction
// reaches the phone, is acknowledged there and comes back DONE; a quality directive is
// applied to the phone's encoder. An official's talkback plays on the phone, and an ICE
// restart (what the app does on a network change) keeps the same session on the wall; a
// session ended at the hub is published anew by the app itself.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { browser, decodedByTile, root, startDemo, waitFor } from "./harness.mjs";

const run = promisify(execFile);
const hubBin = path.join(root, "target", "debug", "hub");
const PLACE = { latitude: 39.9123, longitude: 116.4012, accuracy: 5 };

describe("officer app", () => {
  let demo;
  let chrome;

  before(async () => {
    demo = await startDemo(1);
    chrome = await browser({ media: true });
    await chrome.context.grantPermissions(["geolocation"], { origin: demo.base });
    await chrome.context.setGeolocation(PLACE);
  });

  after(async () => {
    await chrome?.close();
    await demo?.stop();
  });

  const api = async (p) => (await fetch(`${demo.base}${p}`,
    { headers: { Authorization: `Bearer ${demo.token}` } })).json();

  test("a phone publishes, reports where it is, calls SOS and takes an instruction", async () => {
    const { stdout } = await run(hubBin, ["token", "issue", "--data", demo.data, "--role",
      "device", "--subject", "officer-1", "--ttl", "1h"]);
    const phone = await chrome.context.newPage();
    const errors = [];
    phone.on("pageerror", (e) => errors.push(e.message));
    await phone.goto(`${demo.base}/officer`);
    await phone.fill("#token", stdout.trim());
    await phone.click("#signin button");
    await waitFor("officer-1 online", 20000, async () =>
      (await demo.metrics()).tianwang_units_online === 2);

    // The faked position, as the hub stored it.
    const point = await waitFor("officer-1's position at the hub", 15000, async () => {
      const t = await api("/api/telemetry?unit=officer-1");
      return (t.points ?? []).find((p) => p.latitude != null);
    });
    assert.ok(Math.abs(point.latitude - PLACE.latitude) < 1e-6, JSON.stringify(point));
    assert.ok(Math.abs(point.longitude - PLACE.longitude) < 1e-6, JSON.stringify(point));

    await phone.click("#sos");
    await waitFor("an SOS alarm for officer-1", 15000, async () =>
      ((await api("/api/alarms")).alarms ?? []).find((a) => a.rule === "sos" && a.unit === "officer-1"));

    // An instruction from a console: shown on the phone, acknowledged there, DONE.
    const desk = await chrome.context.newPage();
    await desk.goto(`${demo.base}/`);
    await desk.fill("#token", demo.token);
    await desk.click("#signin-form button");
    await desk.waitForSelector("#court-tree li.unit.online", { timeout: 10000 });
    await desk.evaluate(() => window.tianwang.session.direct({ unitId: "officer-1",
      kind: "DIRECTIVE_KIND_MESSAGE", text: "hold position" }));
    const ack = phone.locator("#directives li", { hasText: "hold position" }).locator("button.ack");
    await ack.waitFor({ timeout: 15000 });
    await ack.click();
    const doneStates = async (kind) => desk.evaluate((kind) => window.tianwang.directives.state()
      .list.filter((d) => d.unitId === "officer-1" && d.kind === kind).map((d) => d.state), kind);
    await waitFor("the instruction DONE at the console", 15000, async () =>
      (await doneStates("DIRECTIVE_KIND_MESSAGE")).includes("done"));

    await desk.evaluate(() => window.tianwang.session.direct({ unitId: "officer-1",
      kind: "DIRECTIVE_KIND_QUALITY", bitrate: 300 }));
    await waitFor("the quality directive DONE", 15000, async () =>
      (await doneStates("DIRECTIVE_KIND_QUALITY")).includes("done"));
    const maxBitrate = await phone.evaluate(() => window.officer.state.pc.getSenders()
      .find((s) => s.track?.kind === "video").getParameters().encodings[0].maxBitrate);
    assert.equal(maxBitrate, 300000);

    // Talkback: an official holds to talk to officer-1; the phone plays it (not silence).
    const official = await chrome.context.newPage();
    official.on("pageerror", (e) => errors.push(e.message));
    await official.goto(`${demo.base}/`);
    await official.fill("#token", demo.env.TIANWANG_OFFICIAL_TOKEN);
    await official.click("#signin-form button");
    await official.waitForSelector("#court-tree li.unit.online", { timeout: 10000 });
    await official.evaluate(() => window.tianwang.directives.open("officer-1"));
    await official.locator("#talk-button").hover();
    await official.mouse.down();
    await waitFor("the talk live", 15000, () => official.evaluate(() =>
      window.tianwang.directives.talkLog.some((t) => t.state === "live")));
    const heard = await waitFor("talkback heard on the phone", 15000, () => phone.evaluate(async () => {
      let packets = 0;
      let energy = 0;
      (await window.officer.state.pc.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "audio") {
          packets += r.packetsReceived ?? 0;
          energy += r.totalAudioEnergy ?? 0;
        }
      });
      return packets > 50 && energy > 0 ? { packets, energy } : null;
    }));
    assert.ok(heard.energy > 0, JSON.stringify(heard));
    assert.match(await phone.innerText("#talk"), /Command centre speaking/);
    await official.mouse.up();
    // A video link needs a field agent: the officer app takes talk only, and the official
    // is told so.
    await official.click("#link-button");
    const link = await waitFor("the video link refused", 10000, () => official.evaluate(() =>
      window.tianwang.directives.talkLog.find((t) => t.state === "refused" && t.video)));
    assert.match(link.reason, /needs a field agent/);

    // ICE restart: same WHIP resource, a new ICE session (ETag), the wall keeps decoding.
    await desk.evaluate(() => window.tianwang.wall.assign(0, "officer-1"));
    const decoded = async () => Object.values(await decodedByTile(desk)).reduce((a, b) => a + b, 0);
    await waitFor("officer-1 on the wall", 30000, async () => (await decoded()) > 30);
    const before = await phone.evaluate(() => ({ etag: window.officer.state.etag,
      resource: window.officer.state.resource }));
    await phone.evaluate(() => window.officer.restartIce());
    const after = await phone.evaluate(() => ({ etag: window.officer.state.etag,
      resource: window.officer.state.resource }));
    assert.equal(after.resource, before.resource);
    assert.notEqual(after.etag, before.etag);
    await waitFor("connected again", 15000, () => phone.evaluate(() =>
      window.officer.state.pc.connectionState === "connected"));
    const atRestart = await decoded();
    await waitFor("the wall decoding after the restart", 20000, async () =>
      (await decoded()) > atRestart + 30);
    assert.equal((await demo.metrics()).tianwang_units_online, 2);
    // A fragment that is not SDP is refused with the reason.
    const bad = await phone.evaluate(async () => {
      const r = await fetch(window.officer.state.resource, { method: "PATCH",
        headers: { "Content-Type": "application/trickle-ice-sdpfrag",
          Authorization: `Bearer ${window.officer.state.token}` }, body: "hello" });
      return { status: r.status, text: await r.text() };
    });
    assert.equal(bad.status, 400, bad.text);

    // The session ended by the hub side (here its DELETE): the app publishes anew by itself.
    const cut = Date.now();
    await phone.evaluate(async () => fetch(window.officer.state.resource, { method: "DELETE",
      headers: { Authorization: `Bearer ${window.officer.state.token}` } }));
    const again = await waitFor("published anew", 60000, () => phone.evaluate((old) => {
      const { resource, pc } = window.officer.state;
      return resource && resource !== old && pc?.connectionState === "connected" ? resource : null;
    }, before.resource));
    assert.match(again, /^\/whip\/officer-1\/[0-9a-f]+$/);
    console.log(JSON.stringify({ republished_after_ms: Date.now() - cut }));
    await waitFor("officer-1 online again", 15000, async () =>
      (await demo.metrics()).tianwang_units_online === 2);
    assert.deepEqual(errors, []);
  });
});
