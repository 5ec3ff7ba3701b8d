// Shared by the browser tests: a `hub demo` process on free ports, Debian's Chromium through
// playwright-core, and a few waits. Every wait is bounded.
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import dgram from "node:dgram";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, "../..");
export const artifacts = path.join(here, "artifacts");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Polls `fn` until it returns a truthy value or `ms` pass; returns the value or throws.
export async function waitFor(what, ms, fn) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last) return last;
    await sleep(100);
  }
  throw new Error(`${what}: not within ${ms} ms (last: ${JSON.stringify(last)})`);
}

function freeTcp() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function freeUdp() {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket("udp4");
    s.on("error", reject);
    s.bind(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/// Starts `hub demo` (built by `cargo build --bins`) with `units` simulated units.
export async function startDemo(units = 4) {
  const hubBin = path.join(root, "target", "debug", "hub");
  if (!fs.existsSync(hubBin)) throw new Error(`${hubBin} is missing: cargo build --bins first`);
  const data = fs.mkdtempSync(path.join(os.tmpdir(), "tianwang-browser-"));
  const http = await freeTcp();
  const quic = await freeUdp();
  const log = fs.openSync(path.join(data, "demo.log"), "a");
  const child = spawn(
    hubBin,
    ["demo", "--units", String(units), "--data", data,
      "--quic-listen", `127.0.0.1:${quic}`, "--http-listen", `127.0.0.1:${http}`],
    { stdio: ["ignore", log, log] },
  );
  const envFile = path.join(data, "demo.env");
  const env = await waitFor("demo.env", 20000, () =>
    fs.existsSync(envFile)
      ? Object.fromEntries(
        fs.readFileSync(envFile, "utf8").trim().split("\n").map((l) => {
          const i = l.indexOf("=");
          return [l.slice(0, i), l.slice(i + 1)];
        }),
      )
      : null);
  const base = env.TIANWANG_HTTP;
  const demo = {
    env,
    base,
    data,
    token: env.TIANWANG_TOKEN,
    pid: child.pid,
    log: () => fs.readFileSync(path.join(data, "demo.log"), "utf8"),
    async metrics() {
      const text = await (await fetch(`${base}/metrics`)).text();
      const m = {};
      for (const line of text.split("\n")) {
        if (!line || line.startsWith("#")) continue;
        const i = line.lastIndexOf(" ");
        m[line.slice(0, i)] = Number(line.slice(i + 1));
      }
      return m;
    },
    async stop() {
      child.kill("SIGTERM");
      await Promise.race([new Promise((r) => child.once("exit", r)), sleep(8000)]);
      // TIANWANG_KEEP=1 keeps the demo's data and log for a look after a failure.
      if (process.env.TIANWANG_KEEP) console.log(`demo data kept in ${data}`);
      else fs.rmSync(data, { recursive: true, force: true });
    },
  };
  await waitFor("units online", 30000, async () => {
    const m = await demo.metrics().catch(() => ({}));
    return m.tianwang_units_online === units && m.tianwang_frames_in_total > 50;
  });
  return demo;
}

/// Debian's Chromium, headless, with a fresh profile; with `media`, a fake camera and
/// microphone that need no permission prompt.
export async function browser({ media = false } = {}) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "tianwang-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1600, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--autoplay-policy=no-user-gesture-required",
      ...(media ? ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"] : []),
    ],
  });
  return {
    context,
    async close() {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}

/// Frames decoded so far for each tile's video, by tile id (from the page's own stats).
export async function decodedByTile(page) {
  return page.evaluate(async () => {
    const { session } = window.tianwang;
    const out = {};
    if (!session.pc) return out;
    const stats = await session.pc.getStats();
    for (const [tileId, stream] of session.streams) {
      const track = stream.getVideoTracks()[0];
      stats.forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "video" && r.trackIdentifier === track?.id) {
          out[tileId] = r.framesDecoded ?? 0;
        }
      });
    }
    return out;
  });
}
