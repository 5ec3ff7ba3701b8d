// The officer app in a real browser, against `hub demo`: a phone page (Chromium's fake
// camera and microphone, a faked position) signs in with officer-1's device token at
// /officer, publishes over WHIP and reports telemetry over its control session. The hub
// stores the faked position, the SOS button raises an alarm, and a console's instruction
// reaches the phone, is acknowledged there and comes back DONE; a quality directive is
// applied to the phone's encoder.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { browser, root, startDemo, waitFor } from "./harness.mjs";

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
    assert.deepEqual(errors, []);
  });
});
