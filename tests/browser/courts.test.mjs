// The court tree and directives in a real browser, against `hub demo`. One hub: its court
// ("local") at the root with the simulated units under it, a unit clicked in the tree goes
// on the wall; the directives panel of sim-1 sends an instruction that the agent
// acknowledges and carries out (DONE), a mark, and a quality target below the agent's
// 100 kbit/s minimum that comes back FAILED with the agent's reason; a viewer's directive
// is refused by the hub and the refusal is shown. Three tiers (`hub demo --tiers 3`): the
// supreme court's console shows the tree supreme → high → two intermediate courts with each
// court's units, watches and directs a unit two hubs down; an intermediate court's console
// sees only its own court and is refused a unit of its sibling.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import dgram from "node:dgram";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { artifacts, browser, root, sleep, startDemo, waitFor } from "./harness.mjs";

const hubBin = path.join(root, "target", "debug", "hub");
const run = promisify(execFile);
// The agent answers at once; a directive still open after this is a fault to report.
const DIRECTIVE_MS = 60000;

const courtState = (page) => page.evaluate(() => window.tianwang.courts.state());
const directiveState = (page) => page.evaluate(() => window.tianwang.directives.state());

async function signIn(chrome, base, token, { waitUnits = true } = {}) {
  const page = await chrome.context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${base}/`);
  await page.fill("#token", token);
  await page.click("#signin-form button");
  if (waitUnits) await page.waitForSelector("#court-tree li.unit.online", { timeout: 10000 });
  // Every state the page sees of every directive, in order.
  await page.evaluate(() => {
    window.seenStates = [];
    window.tianwang.directives.addEventListener("change", (e) =>
      window.seenStates.push({ id: e.detail.id, kind: e.detail.kind, state: e.detail.state }));
  });
  return { page, errors };
}

/// The directive list's entry for the newest directive of `kind` to `unit`, once it shows
/// one of `states`; its text and the states the page saw it go through.
async function directiveReaches(page, unit, kind, states) {
  const found = await waitFor(`${kind} to ${unit} reaching ${states.join("/")}`, DIRECTIVE_MS,
    async () => {
      const s = await directiveState(page);
      const d = s.list.find((x) => x.unitId === unit && x.kind === kind);
      return d && states.includes(d.state) ? d : null;
    }).catch(async (e) => {
    const s = await directiveState(page);
    throw new Error(`${e.message}; directives: ${JSON.stringify(s.list.slice(0, 4))}. If it `
      + "stays SENT or DELIVERED, the agent may predate directives: cargo build -p field-agent");
  });
  const li = page.locator(`#directive-list li[data-id="${found.id}"]`);
  await li.waitFor({ timeout: 5000 });
  const seen = await page.evaluate((id) => window.seenStates.filter((x) => x.id === id)
    .map((x) => x.state), found.id);
  return { ...found, li, text: await li.innerText(), cls: await li.getAttribute("class"), seen };
}

const ORDER = ["sent", "delivered", "acknowledged", "done", "failed"];
function assertForward(seen) {
  const ranks = seen.map((s) => Math.min(ORDER.indexOf(s), 3));
  assert.ok(ranks.every((r, i) => r >= 0 && (i === 0 || r >= ranks[i - 1])),
    `states went backwards: ${seen.join(" → ")}`);
}

describe("one hub", () => {
  let demo;
  let chrome;

  before(async () => {
    demo = await startDemo(3);
    chrome = await browser();
  });

  after(async () => {
    await chrome?.close();
    await demo?.stop();
  });

  test("the court tree shows the hub's court with its units; a click watches one", async () => {
    const { page, errors } = await signIn(chrome, demo.base, demo.token);
    const s = await waitFor("three units online in the tree", 10000, async () => {
      const st = await courtState(page);
      return st.courts[0]?.units.filter((u) => u.online).length === 3 ? st : null;
    });
    assert.equal(s.court, "local");
    assert.deepEqual(s.courts.map((c) => [c.code, c.depth, c.tier]), [["local", 0, "intermediate"]]);
    assert.deepEqual(s.courts[0].units.map((u) => u.unitId), ["sim-1", "sim-2", "sim-3"]);
    const court = page.locator('#court-tree li.court[data-court="local"]');
    assert.match(await court.locator("summary").innerText(), /^local\s+3\/3\s+intermediate$/i);
    assert.equal(await court.locator("li.unit.online").count(), 3);

    await court.locator('li.unit[data-unit="sim-2"] .watch').click();
    const slot = await page.evaluate(() =>
      window.tianwang.wall.slots.findIndex((x) => x.unitId === "sim-2"));
    assert.ok(slot >= 0, "sim-2 went on the wall");
    await waitFor("sim-2 decoding on the wall", 10000, () =>
      page.evaluate((i) => window.tianwang.wall.slots[i].video.videoWidth > 0, slot));
    fs.mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "court-tree.png") });

    // The filter narrows the tree like the list; the court stays around its match.
    await page.fill("#unit-filter", "sim-3");
    await waitFor("filtered tree", 2000, async () =>
      (await page.locator("#court-tree li.unit").count()) === 1);
    await page.fill("#unit-filter", "");
    await waitFor("whole tree again", 2000, async () =>
      (await page.locator("#court-tree li.unit").count()) === 3);
    assert.deepEqual(errors, []);
    await page.close();
  });

  test("directives to sim-1: an instruction done, a mark, a quality target failed", async () => {
    const { page, errors } = await signIn(chrome, demo.base, demo.token);
    await page.click('#court-tree li.unit[data-unit="sim-1"] .direct');
    await page.waitForSelector("#directives-panel:not([hidden])", { timeout: 2000 });
    assert.equal(await page.inputValue("#directive-unit"), "sim-1");
    assert.ok(await page.evaluate(() => document.activeElement?.textContent === "Go live"),
      "the keyboard lands on the first order");

    await page.fill("#message-text", "hold position");
    await page.click("#directive-message button[type=submit]");
    const message = await directiveReaches(page, "sim-1", "DIRECTIVE_KIND_MESSAGE", ["done", "failed"]);
    assert.equal(message.state, "done", `instruction: ${message.text}`);
    assert.equal(message.text.includes("hold position"), true);
    assert.match(message.text, /done/i);
    assertForward(message.seen);
    assert.equal(await page.inputValue("#message-text"), "", "the box is cleared once sent");

    await page.fill("#mark-label", "entry");
    await page.click('#directive-mark button[data-action="start"]');
    const mark = await directiveReaches(page, "sim-1", "DIRECTIVE_KIND_MARK", ["done", "failed"]);
    assert.equal(mark.state, "done", `mark: ${mark.text}`);
    assert.match(mark.text, /start entry/);

    await page.fill("#quality-bitrate", "50");
    await page.click("#directive-quality button[type=submit]");
    const quality = await directiveReaches(page, "sim-1", "DIRECTIVE_KIND_QUALITY", ["done", "failed"]);
    assert.equal(quality.state, "failed", `quality 50 kbit/s: ${quality.text}`);
    assert.ok(quality.reason.length > 0, "a failed directive carries its reason");
    assert.match(quality.text, /50 kbit\/s/);
    assert.ok(quality.text.includes(quality.reason), "the reason is shown");
    assert.match(quality.cls, /\bfailed\b/);
    const bg = await quality.li.evaluate((e) => getComputedStyle(e).borderLeftColor);
    assert.equal(bg, "rgb(239, 83, 80)", "a failed directive is marked red");
    assertForward(quality.seen);

    // Newest first; the instruction stays in the list with its final state.
    const list = await page.locator("#directive-list li").evaluateAll((lis) =>
      lis.map((li) => [li.dataset.kind, li.dataset.state]));
    assert.deepEqual(list.slice(0, 3), [["DIRECTIVE_KIND_QUALITY", "failed"],
      ["DIRECTIVE_KIND_MARK", "done"], ["DIRECTIVE_KIND_MESSAGE", "done"]]);
    fs.mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "directives.png") });

    // Esc closes the panel; d opens it again on the same unit.
    await page.keyboard.press("Escape");
    assert.ok(await page.isHidden("#directives-panel"));
    await page.keyboard.press("d");
    await page.waitForSelector("#directives-panel:not([hidden])", { timeout: 2000 });
    assert.equal(await page.inputValue("#directive-unit"), "sim-1");
    assert.deepEqual(errors, []);
    await page.close();
  });

  test("a viewer's directive is refused and the refusal is shown", async () => {
    const viewer = (await run(hubBin, ["token", "issue", "--data", demo.data, "--role", "viewer",
      "--subject", "li.viewer"], { timeout: 10000 })).stdout.trim();
    const { page, errors } = await signIn(chrome, demo.base, viewer);
    // From a tile's header this time.
    await page.click('#court-tree li.unit[data-unit="sim-3"] .watch');
    const slot = await page.evaluate(() =>
      window.tianwang.wall.slots.findIndex((x) => x.unitId === "sim-3"));
    await page.click(`#wall .tile[data-slot="${slot}"] .direct`);
    await page.waitForSelector("#directives-panel:not([hidden])", { timeout: 2000 });
    assert.equal(await page.inputValue("#directive-unit"), "sim-3");
    await page.click('#directives-panel button[data-kind="DIRECTIVE_KIND_KEYFRAME"]');
    await waitFor("refusal shown", 10000, async () =>
      /refused: .*viewer/i.test(await page.innerText("#directives-error")));
    const s = await directiveState(page);
    assert.equal(s.list[0].state, "refused");
    assert.equal(s.list[0].unitId, "sim-3");
    assert.match(s.list[0].reason, /viewer/i);
    assert.match(await page.locator("#directive-list li").first().getAttribute("class"), /\bfailed\b/);
    assert.equal(s.pending, 0);
    assert.deepEqual(errors, []);
    await page.close();
  });
});

function freePort(kind) {
  return new Promise((resolve, reject) => {
    const s = kind === "udp" ? dgram.createSocket("udp4") : net.createServer();
    s.on("error", reject);
    const done = () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    };
    if (kind === "udp") s.bind(0, "127.0.0.1", done);
    else s.listen(0, "127.0.0.1", done);
  });
}

const readEnv = (file) => Object.fromEntries(fs.readFileSync(file, "utf8").trim().split("\n")
  .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));

describe("three tiers", () => {
  let child;
  let data;
  let chrome;
  const env = {};

  before(async () => {
    data = fs.mkdtempSync(path.join(os.tmpdir(), "tianwang-tiers-"));
    const http = await freePort("tcp");
    const quic = await freePort("udp");
    const log = fs.openSync(path.join(data, "demo.log"), "a");
    child = spawn(hubBin, ["demo", "--tiers", "3", "--units", "1", "--data", data,
      "--quic-listen", `127.0.0.1:${quic}`, "--http-listen", `127.0.0.1:${http}`],
    { stdio: ["ignore", log, log] });
    const names = ["supreme", "high", "intermediate-1", "intermediate-2"];
    await waitFor("four env files", 60000, () =>
      names.every((n) => fs.existsSync(path.join(data, `${n}.env`))));
    // Written before the agents start: read them once they are complete.
    await sleep(200);
    for (const n of names) env[n] = readEnv(path.join(data, `${n}.env`));
    chrome = await browser();
  });

  after(async () => {
    await chrome?.close();
    if (child) {
      child.kill("SIGTERM");
      await Promise.race([new Promise((r) => child.once("exit", r)), sleep(10000)]);
    }
    if (data) fs.rmSync(data, { recursive: true, force: true });
  });

  test("the supreme court sees the whole tree and directs a unit two hubs down", async () => {
    const { page, errors } = await signIn(chrome, env.supreme.TIANWANG_HTTP,
      env.supreme.TIANWANG_TOKEN, { waitUnits: false });
    const s = await waitFor("the tree with both intermediate courts' units online", 60000,
      async () => {
        const st = await courtState(page);
        const online = st.courts.flatMap((c) => c.units.filter((u) => u.online).map((u) => u.unitId));
        return st.courts.length === 4 && online.includes("bj1-1") && online.includes("bj2-1") ? st : null;
      }).catch(async (e) => {
      throw new Error(`${e.message}; tree: ${JSON.stringify(await courtState(page))}`);
    });
    assert.equal(s.court, "最高法");
    assert.deepEqual(s.courts.map((c) => [c.code, c.depth, c.tier, c.parent]), [
      ["最高法", 0, "supreme", ""], ["京", 1, "high", "最高法"],
      ["京01", 2, "intermediate", "京"], ["京02", 2, "intermediate", "京"]]);
    assert.deepEqual(s.courts.map((c) => c.units.map((u) => u.unitId)), [[], [], ["bj1-1"], ["bj2-1"]]);
    // Nested in the page as in the data: 京01 inside 京 inside 最高法, named and tiered.
    const nested = page.locator('#court-tree li.court[data-court="最高法"] li.court[data-court="京"] '
      + 'li.court[data-court="京01"] li.unit[data-unit="bj1-1"]');
    assert.equal(await nested.count(), 1);
    assert.match(await page.innerText('#court-tree li.court[data-court="京02"] > details > summary'),
      /^北京市第二中级人民法院\s+1\/1\s+京02\s+intermediate$/i);
    fs.mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "court-tree-3-tiers.png") });

    // Drill down: a unit of an intermediate court plays on the supreme court's wall.
    await nested.locator(".watch").click();
    const slot = await page.evaluate(() =>
      window.tianwang.wall.slots.findIndex((x) => x.unitId === "bj1-1"));
    assert.ok(slot >= 0);
    await waitFor("bj1-1 decoding at the supreme court", 20000, () =>
      page.evaluate((i) => window.tianwang.wall.slots[i].video.videoWidth > 0, slot));

    await nested.locator(".direct").click();
    await page.fill("#message-text", "hold position");
    await page.click("#directive-message button[type=submit]");
    const d = await directiveReaches(page, "bj1-1", "DIRECTIVE_KIND_MESSAGE", ["done", "failed"]);
    assert.equal(d.state, "done", d.text);
    assertForward(d.seen);
    assert.deepEqual(errors, []);
    await page.close();
  });

  test("an intermediate court sees only its own court and is refused its sibling's unit", async () => {
    const { page, errors } = await signIn(chrome, env["intermediate-2"].TIANWANG_HTTP,
      env["intermediate-2"].TIANWANG_TOKEN);
    const s = await courtState(page);
    assert.equal(s.court, "京02");
    assert.deepEqual(s.courts.map((c) => [c.code, c.depth, c.units.map((u) => u.unitId)]),
      [["京02", 0, ["bj2-1"]]]);
    const sent = await page.evaluate(() => window.tianwang.directives.send(
      { unitId: "bj1-1", kind: "DIRECTIVE_KIND_KEYFRAME" }));
    assert.ok(sent);
    const refused = await waitFor("the refusal", 10000, async () =>
      (await directiveState(page)).list.find((x) => x.state === "refused"));
    assert.equal(refused.unitId, "bj1-1");
    assert.ok(refused.reason.length > 0);
    assert.deepEqual(errors, []);
    await page.close();
  });
});
