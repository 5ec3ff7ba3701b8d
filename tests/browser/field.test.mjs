// The console's Map and Alarms in a real browser, against `hub demo`. The map draws the demo
// operation's fence where Web-Mercator puts it (checked here with its own projection), shows
// each unit placed or "no position yet" as the hub's telemetry says, draws raster tiles from a
// configured server (a local one here) or a grid without, and sends a clicked unit to the
// wall. The alarm list follows /api/alarms: a real critical alarm (the hub raises
// unit_offline for a unit of an operation that never connects) beeps once, is highlighted, is
// acknowledged and resolved with comments; 403, 404 and 409 refusals are shown.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import zlib from "node:zlib";
import { promisify } from "node:util";
import { artifacts, browser, root, startDemo, waitFor } from "./harness.mjs";

const CASE = "(2026)京0113执1234号";
const FENCE = { lat: 39.9087, lon: 116.3975, radiusM: 300 };
const EARTH_M = 40075016.686;
const TRAIL_US = 10 * 60 * 1_000_000;
const BOUNDED = { timeout: 150000 };
const hubBin = path.join(root, "target", "debug", "hub");
const run = promisify(execFile);

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

async function api(url, { token = demo.token, method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(`${demo.base}${url}`, { method, headers, body,
    signal: AbortSignal.timeout(10000) });
  return { status: res.status, body: await res.json() };
}

async function signIn(token = demo.token) {
  const page = await chrome.context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${demo.base}/`);
  await page.fill("#token", token);
  await page.click("#signin-form button");
  await page.waitForSelector("#units li.online", { timeout: 5000 });
  return { page, errors };
}

const mapState = (page) => page.evaluate(() => window.tianwang.map.state());

/// The map's state and what its SVG shows, read together after a draw of that state: a poll
/// between two separate reads could refit the view in between.
const snapshot = (page) => page.evaluate(() => {
  const { map } = window.tianwang;
  map.render();
  const svg = document.getElementById("map-svg");
  const fences = {};
  for (const g of svg.querySelectorAll(".fence")) {
    const c = g.querySelector(".fence-area");
    if (c) fences[g.dataset.id] = Object.fromEntries(["cx", "cy", "r"].map((k) => [k, Number(c.getAttribute(k))]));
  }
  const markers = {};
  for (const g of svg.querySelectorAll(".marker")) {
    const [, x, y] = g.getAttribute("transform").match(/translate\(([-\d.]+) ([-\d.]+)\)/).map(Number);
    markers[g.dataset.unit] = { x, y };
  }
  return { state: map.state(), fences, markers };
});
const alarmState = (page) => page.evaluate(() => window.tianwang.alarms.state());

/// Web-Mercator, written again here so the map's own projection is checked, not reused.
function mercator(lat, lon) {
  const phi = (lat * Math.PI) / 180;
  return { x: (lon + 180) / 360, y: (1 - Math.log(Math.tan(phi) + 1 / Math.cos(phi)) / Math.PI) / 2 };
}

/// Where the map must draw (lat, lon), from the view it reports (centre, zoom, size).
function expectedPx(view, lat, lon) {
  const c = mercator(view.lat, view.lon);
  const p = mercator(lat, lon);
  const s = 256 * 2 ** view.zoom;
  return { x: (p.x - c.x) * s + view.width / 2, y: (p.y - c.y) * s + view.height / 2, s };
}

const near = (a, b, tol, what) =>
  assert.ok(Math.abs(a - b) <= tol, `${what}: ${a} is not within ${tol} of ${b}`);

/// A 256×256 one-colour PNG, for the test's tile server.
function png() {
  const table = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = table[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, "ascii");
    data.copy(out, 8);
    out.writeUInt32BE(crc(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(256, 0);
  ihdr.writeUInt32BE(256, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const row = Buffer.concat([Buffer.from([0]), Buffer.alloc(256 * 3, 0x33)]);
  const idat = zlib.deflateSync(Buffer.concat(Array(256).fill(row)));
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr), chunk("IDAT", idat), chunk("IEND", Buffer.alloc(0))]);
}

async function tileServer() {
  const image = png();
  const requests = [];
  const server = http.createServer((req, res) => {
    requests.push(req.url);
    if (/^\/tiles\/\d+\/\d+\/\d+\.png$/.test(req.url)) {
      res.writeHead(200, { "Content-Type": "image/png" });
      res.end(image);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  return { template: `http://127.0.0.1:${port}/tiles/{z}/{x}/{y}.png`, requests,
    close: () => new Promise((r) => server.close(r)) };
}

test("the map draws the demo operation's fence, the units placed or not, tiles or a grid",
  BOUNDED, async () => {
    const { page, errors } = await signIn();
    await page.keyboard.press("m");
    assert.ok(await page.isVisible("#map-view"));
    assert.ok(await page.isHidden("#wall"));
    assert.ok(await page.isVisible("#alarms-panel"), "the alarm list stays beside the map");
    const shot = await waitFor("the map's first poll with the fence", 8000, async () => {
      const s = await snapshot(page);
      return s.state.polls >= 1 && Object.keys(s.fences).length && s.state.view.width > 0 ? s : null;
    });
    const first = shot.state;

    // The demo operation's fence, where it is, as large as it is.
    const fence = first.fences.find((f) => f.caseNumber === CASE);
    assert.ok(fence, JSON.stringify(first.fences));
    assert.deepEqual([fence.lat, fence.lon, fence.radiusM], [FENCE.lat, FENCE.lon, FENCE.radiusM]);
    assert.deepEqual(fence.units, ["sim-1", "sim-2"]);
    const drawn = shot.fences[fence.id];
    const want = expectedPx(first.view, FENCE.lat, FENCE.lon);
    const wantR = (FENCE.radiusM / (EARTH_M * Math.cos((FENCE.lat * Math.PI) / 180))) * want.s;
    near(drawn.cx, want.x, 0.5, "fence centre x");
    near(drawn.cy, want.y, 0.5, "fence centre y");
    near(drawn.r, wantR, 0.5, "fence radius");
    // Fitted: the whole circle in sight and not a speck.
    assert.ok(drawn.cx - drawn.r >= 0 && drawn.cx + drawn.r <= first.view.width
      && drawn.cy - drawn.r >= 0 && drawn.cy + drawn.r <= first.view.height,
    `fence ${JSON.stringify(drawn)} outside ${first.view.width}×${first.view.height}`);
    assert.ok(drawn.r > 50, `fence radius ${drawn.r} px`);
    // The scale bar agrees with the fence: 300 m on the bar is the circle's radius.
    const { scale } = first;
    near(scale.px / scale.metres, drawn.r / FENCE.radiusM, (0.01 * drawn.r) / FENCE.radiusM,
      "scale bar px per metre");
    assert.equal(await page.locator("#map-scale .label").innerText(),
      scale.metres >= 1000 ? `${scale.metres / 1000} km` : `${scale.metres} m`);

    // No tile server configured: a grid, no tiles.
    assert.equal(first.tiles.template, "");
    assert.equal(first.tiles.shown, 0);
    assert.ok(first.grid > 0, "grid lines");
    assert.match(await page.locator("#map-source").innerText(), /no tile server/);

    // Every unit of the session is listed, placed or "no position yet", as the hub says.
    assert.deepEqual(first.units.map((u) => u.unit), ["sim-1", "sim-2"]);
    const t0 = Date.now() * 1000;
    const truth = await api(`/api/telemetry?unit=sim-1&from_us=${t0 - TRAIL_US}&to_us=${t0}`);
    assert.equal(truth.status, 200);
    const fixes = truth.body.points.filter((p) => p.latitude != null && p.longitude != null);
    const marker = await waitFor("a marker for sim-1", 10000, async () =>
      (await mapState(page)).markers.find((m) => m.unit === "sim-1")).catch(() => null);
    if (fixes.length) assert.ok(marker, `the hub has ${fixes.length} fixes of sim-1, the map none`);
    const placedShot = await snapshot(page);
    const placed = placedShot.state;
    console.log(JSON.stringify({ fixes_sim1: fixes.length, markers: placed.markers.length,
      no_position: placed.noPosition, zoom: Number(placed.view.zoom.toFixed(2)), fence: drawn }));
    if (!marker) {
      assert.ok(placed.noPosition.includes("sim-1"));
      assert.match(await page.locator('#map-units li[data-unit="sim-1"] .info').innerText(),
        /^no position yet/);
      assert.equal(await page.locator('#map-svg .marker[data-unit="sim-1"]').count(), 0);
    }

    // When the units report positions: each marker where its fix is, a trail growing.
    for (const m of placed.markers) {
      const p = expectedPx(placed.view, m.lat, m.lon);
      near(m.x, p.x, 0.5, `${m.unit} marker x`);
      near(m.y, p.y, 0.5, `${m.unit} marker y`);
      assert.ok(m.trail >= 1);
      assert.ok(["online", "offline", "alarm"].includes(m.state));
      const { x, y } = placedShot.markers[m.unit];
      near(x, p.x, 0.1, `${m.unit} drawn x`);
      near(y, p.y, 0.1, `${m.unit} drawn y`);
    }
    if (marker) {
      const latest = await api(`/api/telemetry?unit=sim-1&from_us=${marker.atUs}`);
      assert.ok(latest.body.points.some((p) => p.at_us === marker.atUs
        && p.latitude === marker.lat && p.longitude === marker.lon), "the marker is a hub fix");
      await waitFor("sim-1's trail growing", 8000, async () =>
        (await mapState(page)).markers.find((m) => m.unit === "sim-1")?.trail >= 2);
      // Positions come pushed over the session, about a batch a second.
      await waitFor("positions pushed to the map", 5000, async () =>
        (await mapState(page)).pushes >= 1);
      assert.ok(await page.locator('#map-svg .trail[data-unit="sim-1"]').count() === 1);
    }
    fs.mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "map.png") });

    // Wheel zooms about the pointer, a drag pans, f fits again.
    const box = await page.locator("#map").boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    await page.mouse.wheel(0, -300);
    const zoomed = await waitFor("zoomed in", 2000, async () => {
      const s = await mapState(page);
      return s.view.zoom > placed.view.zoom + 0.5 ? s : null;
    });
    assert.equal(zoomed.view.follow, false);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width / 2 + 200, box.y + box.height / 2 + 80, { steps: 5 });
    await page.mouse.up();
    const panned = await mapState(page);
    assert.ok(panned.view.lon < zoomed.view.lon, "dragging right shows what is west");
    await page.focus("#map");
    await page.keyboard.press("f");
    const refitted = await waitFor("fitted again", 2000, async () => {
      const s = await mapState(page);
      return s.view.follow ? s : null;
    });
    const f = refitted.fences.find((x) => x.id === fence.id);
    assert.ok(f.x - f.r >= 0 && f.x + f.r <= refitted.view.width && f.y - f.r >= 0
      && f.y + f.r <= refitted.view.height, `fence in sight after f: ${JSON.stringify(f)}`);

    // A tile server: standard z/x/y tiles under the fence, remembered in localStorage.
    const tiles = await tileServer();
    try {
      await page.fill("#tile-url", "ftp://nowhere/{z}/{x}/{y}");
      await page.click("#tile-form button[type=submit]");
      assert.match(await page.locator("#tile-error").innerText(), /\{z\}/);
      await page.fill("#tile-url", tiles.template);
      await page.click("#tile-form button[type=submit]");
      const tiled = await waitFor("tiles drawn", 5000, async () => {
        const s = await mapState(page);
        return s.tiles.drawn > 0 && s.tiles.drawn === s.tiles.shown ? s : null;
      });
      assert.equal(await page.evaluate(() => localStorage.getItem("tianwang.tiles")), tiles.template);
      const z = Math.round(tiled.view.zoom);
      const c = mercator(FENCE.lat, FENCE.lon);
      const under = `/tiles/${z}/${Math.floor(c.x * 2 ** z)}/${Math.floor(c.y * 2 ** z)}.png`;
      assert.ok(tiles.requests.includes(under), `${under} not in ${tiles.requests.join(" ")}`);
      assert.equal(tiled.tiles.failed, 0);
      assert.match(await page.locator("#map-source").innerText(), /tiles: 127\.0\.0\.1/);
      // The fence and the markers are drawn over the tiles.
      assert.ok(await page.evaluate(() => {
        const s = document.getElementById("map-svg");
        return s.querySelector(".layer-tiles").compareDocumentPosition(
          s.querySelector(".layer-fences")) & Node.DOCUMENT_POSITION_FOLLOWING;
      }));
      await page.screenshot({ path: path.join(artifacts, "map-tiles.png") });
      await page.click("#tile-clear");
      const plain = await mapState(page);
      assert.equal(plain.tiles.template, "");
      assert.equal(await page.locator("#map-svg image.tile").count(), 0);
      assert.equal(await page.evaluate(() => localStorage.getItem("tianwang.tiles")), null);
    } finally {
      await tiles.close();
    }

    // Watch: from the map's list (and from a marker when there is one) onto the wall.
    await page.click('#map-units li[data-unit="sim-2"] .watch');
    assert.ok(await page.isVisible("#wall"));
    assert.ok(await page.isHidden("#map-view"));
    await waitFor("sim-2 live on the wall", 8000, async () => page.evaluate(() =>
      window.tianwang.wall.slots.some((s) => s.unitId === "sim-2" && s.status === "live")));
    if (marker) {
      await page.keyboard.press("m");
      await page.locator('#map-svg .marker[data-unit="sim-1"] .dot').click();
      assert.ok(await page.isVisible("#wall"));
      assert.ok(await page.evaluate(() =>
        window.tianwang.wall.slots.some((s) => s.unitId === "sim-1")));
    }
    assert.deepEqual(errors, []);
    await page.close();
  });

test("alarms: a real critical alarm beeps once, is acknowledged and resolved; refusals shown",
  BOUNDED, async () => {
    const { page, errors } = await signIn();
    const loaded = await waitFor("alarms loaded", 5000, async () => {
      const s = await alarmState(page);
      return s.loaded ? s : null;
    });
    assert.equal(loaded.audio, "running", "the sign-in click lets the alarm sound play");
    // The list is the hub's.
    const hub = await api("/api/alarms");
    assert.equal(hub.status, 200);
    if (!hub.body.alarms.length && !loaded.list.length) {
      assert.ok(await page.isVisible("#alarms-empty"));
      assert.equal(await page.locator("#alarms-empty").innerText(), "No alarms.");
      assert.equal(await page.locator("#alarm-badge").innerText(), "0 alarms");
    } else {
      await waitFor("the hub's alarms listed", 5000, async () => {
        const shown = (await alarmState(page)).list.map((a) => a.id);
        return hub.body.alarms.every((a) => shown.includes(a.id));
      });
    }

    // An unknown id: the hub's 404 is shown, not thrown.
    const unknown = await page.evaluate(() => window.tianwang.alarms.ack("a0-none", "test"));
    assert.equal(unknown.status, 404);
    assert.match(await page.locator("#alarms-error").innerText(), /404 no alarm a0-none/);

    // A unit of an operation that never connects: the hub raises unit_offline (critical)
    // after its grace period (30 s).
    const { stdout } = await run(hubBin, ["case", "--hub", demo.base, "--token", demo.token,
      "operation", "--case", CASE, "--units", "ghost-1", "--lat", "39.9150", "--lon",
      "116.4050", "--radius", "150", "--name", "ghost check"], { timeout: 10000 });
    const opId = stdout.match(/operation (\S+)/)[1];
    const started = Date.now();
    const alarm = await waitFor("unit_offline for ghost-1 in the list", 60000, async () =>
      (await alarmState(page)).list.find((a) => a.unit === "ghost-1" && a.rule === "unit_offline"));
    console.log(JSON.stringify({ alarm_after_ms: Date.now() - started, id: alarm.id }));
    assert.equal(alarm.severity, "critical");
    assert.equal(alarm.state, "raised");
    assert.equal(alarm.operation_id, opId);
    assert.equal(alarm.case_number, CASE);
    const item = page.locator(`#alarm-list li[data-id="${alarm.id}"]`);
    assert.match(await item.getAttribute("class"), /\bsev-critical\b.*\balert\b/);
    assert.equal(await item.locator(".rule").innerText(), "unit offline");
    assert.equal(await item.locator(".unit").innerText(), "ghost-1");
    assert.match(await item.locator(".a-evidence").innerText(), /^offline since \d{2}:\d{2}:\d{2}/);
    assert.match(await item.locator("time").innerText(), /^\d{2}:\d{2}:\d{2}$/);
    assert.match(await page.locator("#alarm-badge").getAttribute("class"), /\balert\b/);
    // One sound for it, and no more on later reads of the list.
    const heard = await alarmState(page);
    assert.ok(heard.sounded.includes(alarm.id));
    assert.equal(heard.beepLog.filter((b) => b.ids.includes(alarm.id)).length, 1);
    assert.equal(heard.blocked, 0);
    // It came pushed over the session (the list is read again only every 30 s).
    assert.ok(heard.pushes >= 1, JSON.stringify(heard.pushes));
    await page.evaluate(() => window.tianwang.alarms.poll());
    await page.evaluate(() => window.tianwang.alarms.poll());
    assert.ok((await alarmState(page)).polls >= heard.polls + 2);
    assert.equal((await alarmState(page)).beepLog.filter((b) => b.ids.includes(alarm.id)).length, 1);

    // Beside the map too, where the unit is in alarm and its operation's fence is drawn.
    await page.keyboard.press("m");
    assert.ok(await page.isVisible(`#alarm-list li[data-id="${alarm.id}"]`));
    const onMap = await waitFor("ghost-1 in alarm on the map", 15000, async () => {
      const s = await mapState(page);
      const u = s.units.find((x) => x.unit === "ghost-1");
      return u?.state === "alarm" && s.fences.some((f) => f.id === opId) ? s : null;
    });
    assert.ok(onMap.noPosition.includes("ghost-1"));
    await waitFor("a push of positions after that", 5000, async () =>
      (await mapState(page)).pushes > onMap.pushes);
    assert.match(await page.locator('#map-units li[data-unit="ghost-1"]').innerText(),
      /ghost-1\s+alarm[\s\S]*no position yet/i);
    fs.mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "alarms.png") });
    await page.keyboard.press("w");

    // A viewer may read the list but not settle: the 403 is shown beside the alarm.
    const viewer = (await run(hubBin, ["token", "issue", "--data", demo.data, "--role", "viewer",
      "--subject", "wang.viewer"], { timeout: 10000 })).stdout.trim();
    const other = await signIn(viewer);
    const vItem = other.page.locator(`#alarm-list li[data-id="${alarm.id}"]`);
    await vItem.waitFor({ timeout: 5000 });
    await vItem.locator(".ack").click();
    await vItem.locator(".a-form input").fill("not mine to take");
    await vItem.locator(".a-form input").press("Enter");
    await waitFor("403 shown", 5000, async () => /403 .*viewer/i.test(await vItem.locator(".error").innerText()));
    assert.equal((await api("/api/alarms")).body.alarms.find((a) => a.id === alarm.id).state, "raised");
    assert.deepEqual(other.errors, []);
    await other.page.close();

    // Acknowledged by keyboard: the button, a comment, Enter.
    await item.locator(".ack").focus();
    await page.keyboard.press("Enter");
    assert.ok(await page.evaluate(() => document.activeElement?.closest(".a-form") != null),
      "the comment field has the focus");
    await page.keyboard.type("patrol car 3 is on its way");
    await page.keyboard.press("Enter");
    await waitFor("acknowledged in the list", 5000, async () =>
      (await alarmState(page)).list.find((a) => a.id === alarm.id)?.state === "acknowledged");
    const acked = (await api("/api/alarms")).body.alarms.find((a) => a.id === alarm.id);
    assert.equal(acked.state, "acknowledged");
    assert.equal(acked.acked_by, "demo-console");
    assert.equal(acked.comment, "patrol car 3 is on its way");
    assert.match(await item.locator(".a-state").innerText(),
      /acknowledged by demo-console .*patrol car 3 is on its way/);
    assert.doesNotMatch(await item.getAttribute("class"), /\balert\b/);
    assert.ok(await item.locator(".ack").isHidden());

    // Twice: the hub's 409 is shown.
    const twice = await page.evaluate((id) => window.tianwang.alarms.ack(id, "again"), alarm.id);
    assert.equal(twice.status, 409);
    assert.match(await page.locator("#alarms-error").innerText(), /409 .*acknowledged already/);

    // Esc closes a comment field without sending; then resolved with the mouse.
    await item.locator(".resolve").click();
    await page.keyboard.press("Escape");
    assert.ok(await item.locator(".a-form").isHidden());
    await item.locator(".resolve").click();
    await item.locator(".a-form input").fill("ghost-1 was never deployed: operation planned in error");
    await item.locator(".a-form button[type=submit]").click();
    await waitFor("resolved in the list", 5000, async () =>
      (await alarmState(page)).list.find((a) => a.id === alarm.id)?.state === "resolved");
    const resolved = (await api("/api/alarms")).body.alarms.find((a) => a.id === alarm.id);
    assert.equal(resolved.resolved_by, "demo-console");
    assert.match(resolved.comment, /never deployed/);
    assert.ok(await item.locator(".resolve").isHidden());
    const again = await page.evaluate((id) => window.tianwang.alarms.resolve(id, "again"), alarm.id);
    assert.equal(again.status, 409);
    assert.match(await page.locator("#alarms-error").innerText(), /409 .*resolved already/);

    const end = await alarmState(page);
    assert.deepEqual(end.errors.map((e) => e.status), [404, 409, 409]);
    assert.equal(end.pollError, null);
    assert.deepEqual(errors, []);
    await page.close();
  });
