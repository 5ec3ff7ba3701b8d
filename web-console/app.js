// Tianwang command console: sign-in, then the wall, the map or the cases, with the alarm list
// beside them. Plain ES modules, no build step.
import { Alarms } from "./alarms.js";
import { Cases } from "./cases.js";
import { CourtTree } from "./courts.js";
import { Directives } from "./directives.js";
import { MapView } from "./map.js";
import { Session } from "./session.js";
import { Wall } from "./wall.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "tianwang.token";

function status(text) {
  $("status").textContent = text;
}

function showSignin(message = "") {
  $("console").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("token").focus();
}

function start(token) {
  $("signin").hidden = true;
  $("console").hidden = false;
  const session = new Session(token);
  const wall = new Wall(session, $("wall"), $("units"));
  const cases = new Cases(token, $("cases-view"));
  // Made here, inside the sign-in click when there is one, so its alarm sound may play.
  const alarms = new Alarms(token, $("alarms-panel"), $("alarm-badge"));
  let view = "wall";
  // The wall keeps running behind the map and the cases: its tiles are still there on the
  // way back. The alarm list stays beside every view.
  const showView = (name) => {
    view = name;
    const onWall = name === "wall";
    $("wall").hidden = !onWall;
    $("units-panel").hidden = !onWall;
    $("layouts").hidden = !onWall;
    $("map-view").hidden = name !== "map";
    $("cases-view").hidden = name !== "cases";
    document.querySelectorAll("#views button").forEach((b) =>
      b.setAttribute("aria-pressed", String(b.dataset.view === name)));
    if (!onWall) wall.unenlarge();
    if (name === "map") {
      // Arriving on the map shows everything; a pan or zoom lasts while it stays open.
      map.show().catch(() => {});
      map.refit();
    } else {
      map.hide();
    }
    if (name === "cases") cases.load().then(() => cases.focusList(), () => {});
    else cases.video.pause();
  };
  const map = new MapView(session, wall, token, $("map-view"), {
    // A unit clicked on the map goes on the wall, where it can be watched.
    onWatch: (unit) => {
      showView("wall");
      const slot = wall.watch(unit);
      status(`${unit} on tile ${slot + 1}`);
    },
    alarmUnits: () => alarms.activeUnits(),
  });
  alarms.addEventListener("change", () => map.changed());
  alarms.listen(session);
  alarms.start();
  // Directives to one unit, opened from the court tree, a tile's header or key d.
  const directives = new Directives(session, $("directives-panel"), {
    units: () => [...wall.units.values()],
    onSelect: (unit) => courts.select(unit),
    // A video link fills the screen with the unit (its tile enlarged, with its sound) and
    // shows your camera in a corner until it ends.
    onLink: (unit) => {
      const self = $("link-self");
      if (!unit) {
        self.hidden = true;
        $("link-self-video").srcObject = null;
        return;
      }
      showView("wall");
      const slot = wall.watch(unit);
      if (wall.enlargedUnit() !== unit) {
        wall.unenlarge();
        wall.toggleEnlarge(slot);
      }
      $("link-self-label").textContent = `you → ${unit}`;
      $("link-self-video").srcObject = session.camera;
      self.hidden = false;
      status(`video link with ${unit}`);
    },
  });
  $("link-end").addEventListener("click", () => directives.linkStop());
  const courts = new CourtTree(session, $("court-tree"), $("court-count"), {
    // A unit anywhere below the user's court goes on the wall like one of the list.
    onWatch: (unit) => {
      const slot = wall.watch(unit);
      status(`${unit} on tile ${slot + 1}`);
    },
    onDirect: (unit) => directives.open(unit),
  });
  wall.onDirect = (unit) => directives.open(unit);
  window.tianwang = { session, wall, cases, map, alarms, courts, directives, showView };

  session.addEventListener("ready", (e) => {
    const r = e.detail;
    $("conn").textContent = "connected";
    $("conn").className = "badge ok";
    $("hub-id").textContent = `hub ${r.hubId}`;
    $("user").textContent = `${r.user} · ${r.role}`;
    wall.setUnits(r.units ?? []);
    status(`session ${r.sessionId}`);
  });
  session.addEventListener("unit", (e) => wall.updateUnit(e.detail));
  session.addEventListener("error", (e) => {
    const err = e.detail;
    status(`${err.tileId ? `tile ${err.tileId}: ` : ""}${err.message}`);
    if (err.code === "ERROR_CODE_UNAUTHORIZED") {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignin(err.message);
    }
  });
  session.addEventListener("peer", (e) => status(`media ${e.detail}`));
  session.addEventListener("close", (e) => {
    $("conn").textContent = "disconnected";
    $("conn").className = "badge bad";
    if (!$("signin").hidden) return;
    status(`session closed${e.detail.reason ? `: ${e.detail.reason}` : ""}`);
  });

  document.querySelectorAll("#views button").forEach((b) => {
    b.onclick = () => showView(b.dataset.view);
  });
  document.querySelectorAll("#layouts button").forEach((b) => {
    b.onclick = () => wall.setLayout(Number(b.dataset.layout));
  });
  $("unit-filter").oninput = (e) => {
    wall.filter = e.target.value.trim().toLowerCase();
    wall.renderUnits();
    courts.setFilter(e.target.value);
  };
  $("signout").onclick = () => {
    sessionStorage.removeItem(TOKEN_KEY);
    session.close();
    alarms.stop();
    location.reload();
  };
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement
        || e.target instanceof HTMLSelectElement) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "c") return showView("cases");
    if (e.key === "w") return showView("wall");
    if (e.key === "m") return showView("map");
    if (e.key === "a") return alarms.focus();
    if (e.key === "d") {
      // The enlarged tile's unit, else the one open already, else the first online.
      const unit = wall.enlargedUnit() ?? directives.unitId
        ?? [...wall.units.values()].find((u) => u.online)?.unitId;
      if (unit) directives.open(unit);
      return;
    }
    if (view !== "wall") return;
    if (e.key === "t") {
      $("courts-section").open = true;
      return courts.focus();
    }
    const layouts = { 1: 1, 2: 4, 3: 9, 4: 16 };
    if (layouts[e.key]) wall.setLayout(layouts[e.key]);
    else if (e.key === "Escape") wall.unenlarge();
    else if (e.key === "/") {
      e.preventDefault();
      $("unit-filter").focus();
    }
  });
  session.connect();
}

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  start(token);
});

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) start(saved);
else showSignin();
