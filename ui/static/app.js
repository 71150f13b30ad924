// The operator dashboard. Every call goes through the client generated from the query API's
// OpenAPI document (api.js); live changes come from one server-sent event stream and are
// applied to what is on screen, so an alert storm never turns into a request storm.
import * as client from "./api.js";
import { historyChart, liveChart } from "./charts.js";

const $ = (selector) => document.querySelector(selector);
const METRICS = ["power_kw", "soc_pct", "voltage_v", "frequency_hz", "temperature_c", "current_a"];
const SEVERITIES = ["critical", "major", "minor", "warning"];
const LIVE_WINDOW_S = 600; // the device page's live chart
const SPARK_POINTS = 40;
const OPERATORS = new Set(["admin", "operator"]);

const state = {
  token: sessionStorage.getItem("token"),
  role: sessionStorage.getItem("role"),
  user: sessionStorage.getItem("user"),
  site: sessionStorage.getItem("site") || "",
  stream: null,
  lastEventId: null,
  ready: false, // the views' first snapshot is loaded: alert events change counts from here on
  retry: null,
  backoff: 1000,
  offlineAfterS: 120,
  catalogue: null,
  rules: new Map(), // rule id -> name
  unread: 0,
  severityCounts: Object.fromEntries(SEVERITIES.map((s) => [s, 0])),
  devices: new Map(), // overview rows: id -> device
  devicesCursor: null,
  spark: new Map(), // id -> [values]
  alerts: null, // the alert groups on screen: {filter, groups, open, target}
  device: null, // the device page: {id, device, live, history, commands, alerts}
  notifications: new Map(), // the notifications view: id -> notification
  applied: new Set(), // `${event}:${id}` of alert and notification events applied (dedupe)
};

const canAct = () => OPERATORS.has(state.role);
const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
const age = (t) => (Date.now() - new Date(t).getTime()) / 1000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
const badge = (text, cls) => el("span", { class: `badge ${cls}`, text });
const deviceLink = (id) => el("a", { href: `#/devices/${encodeURIComponent(id)}`, text: id });

// ---- rendering is batched per animation frame: a thousand events cost one repaint ----
const dirty = new Set();
let frame = 0;
function schedule(what) {
  dirty.add(what);
  if (!frame) frame = requestAnimationFrame(flush);
}
function flush() {
  frame = 0;
  const jobs = [...dirty];
  dirty.clear();
  for (const job of jobs) job();
}

function say(text) {
  $("#message").textContent = text;
}
// an action the API refused: say why
async function act(call, where = say) {
  try {
    return await call();
  } catch (e) {
    where(`Not done: ${e.message}`);
    return null;
  }
}

// ---------------------------------------------------------------- session ----
client.configure({ token: state.token, onUnauthorized: () => expire("Your session ended") });

function tokenExpired() {
  try {
    const payload = JSON.parse(atob(state.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return payload.exp * 1000 <= Date.now();
  } catch {
    return true;
  }
}

function expire(reason) {
  if (!state.token) return;
  stopStream();
  setLive("expired", "Session expired");
  state.token = null;
  client.configure({ token: null });
  sessionStorage.removeItem("token");
  showLogin(`${reason}: log in again.`);
}

function showLogin(message = "") {
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#nav").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
  $("#session").hidden = !message; // keep the "expired" indicator in sight
  $("#login input[name=username]").focus();
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = Object.fromEntries(new FormData(event.target));
  let body;
  try {
    body = await client.login({ body: form });
  } catch (e) {
    $("#login-error").textContent = e.status === 401 ? "Wrong username or password." : e.message;
    return;
  }
  Object.assign(state, { token: body.access_token, role: body.role, user: form.username });
  sessionStorage.setItem("token", state.token);
  sessionStorage.setItem("role", state.role);
  sessionStorage.setItem("user", state.user);
  client.configure({ token: state.token });
  event.target.reset();
  start();
});

$("#logout").addEventListener("click", () => {
  stopStream();
  state.token = null;
  state.site = "";
  sessionStorage.clear();
  client.configure({ token: null });
  setLive("connecting", "Logged out");
  showLogin();
});

$("#site-scope").addEventListener("change", (event) => {
  state.site = event.target.value;
  sessionStorage.setItem("site", state.site);
  restart();
});

async function start() {
  $("#login").hidden = true;
  $("#session").hidden = false;
  $("#nav").hidden = false;
  $("#user").textContent = state.user || "";
  $("#role").textContent = state.role;
  $("#control").hidden = !canAct();
  restart();
}

// a new site scope or a new session: a fresh stream, then, once it is open (its position is
// fixed), fresh snapshots; alert and notification events count from the snapshots on
function restart() {
  state.ready = false;
  state.lastEventId = null;
  state.applied.clear();
  state.devices.clear();
  state.spark.clear();
  connect();
}

async function loadShared() {
  const [overview, rules, catalogue] = await Promise.all([
    act(() => client.getOverview({ site_id: state.site || undefined })),
    state.rules.size ? null : act(() => client.listRules()),
    state.catalogue ? null : act(() => client.getCatalogue()),
  ]);
  if (rules) for (const r of rules.items) state.rules.set(r.id, r.name);
  if (catalogue) state.catalogue = catalogue;
  if (overview) applyOverview(overview);
}

// ----------------------------------------------------------------- stream ----
function setLive(s, text) {
  const live = $("#live");
  live.dataset.state = s;
  live.textContent = text;
}

function stopStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  clearTimeout(state.retry);
}

const HANDLERS = {
  "device.latest": onLatest,
  "alert.opened": onAlert,
  "alert.cleared": onAlert,
  "alert.acknowledged": onAlert,
  "notification.created": onNotification,
  "notification.acked": onNotification,
  "control.updated": onCommand,
};

function connect() {
  stopStream();
  if (!state.token) return;
  setLive(state.lastEventId ? "reconnecting" : "connecting",
    state.lastEventId ? "Reconnecting…" : "Connecting…");
  const stream = new EventSource(client.streamUrl({
    access_token: state.token,
    site_id: state.site || undefined,
    last_event_id: state.lastEventId || undefined,
  }));
  state.stream = stream;
  let resumed = Boolean(state.lastEventId);
  stream.onopen = () => {
    setLive("live", "Live");
    state.backoff = 1000;
    if (!state.ready) {
      // the first snapshots, read now that the stream's position is fixed (or again: the
      // last attempt did not finish)
      loadShared().then(() => route(true));
    } else if (resumed) {
      say("");
      // latest values are a lossy feed that starts afresh: show the current ones again
      reloadLatest();
    }
    resumed = true;
  };
  stream.onerror = (event) => {
    if (event.data) return; // the server's own notice (below)
    if (stream.readyState === EventSource.CLOSED) {
      // refused (API starting, token gone): the browser gives up, so try again ourselves,
      // from the last event's id; without one (nothing came yet) read the views again
      if (tokenExpired()) return expire("Session expired");
      stopStream();
      setLive("reconnecting", "Reconnecting…");
      const delay = state.backoff;
      state.backoff = Math.min(state.backoff * 2, 10_000);
      state.retry = setTimeout(async () => {
        // a refusal other than expiry (user deleted, secret rotated): a call says which,
        // and a 401 leads back to the login form
        try {
          await client.getOverview({ site_id: state.site || undefined });
        } catch (e) {
          if (e.status === 401 || e.status === 403) return;
        }
        if (!state.token) return;
        // from the last event's id; without one (none came yet) read the views again
        if (state.lastEventId) connect();
        else restart();
      }, delay);
    } else {
      setLive("reconnecting", "Reconnecting…"); // the browser retries with Last-Event-ID
    }
  };
  stream.addEventListener("error", (event) => {
    if (!event.data) return;
    // fell behind, or resumed after events were dropped: what is on screen may be stale, and
    // what the stream sends next would be counted on top of it: start afresh from now
    say(`Live updates: ${JSON.parse(event.data).reason}; views reloaded.`);
    restart();
  });
  stream.addEventListener("session.expired", () => expire("Session expired"));
  for (const [name, handle] of Object.entries(HANDLERS)) {
    stream.addEventListener(name, (event) => {
      if (event.lastEventId) state.lastEventId = event.lastEventId;
      handle(JSON.parse(event.data), name);
    });
  }
}

async function reloadLatest() {
  if (currentView() === "overview") await loadDevices();
  if (state.device) await Promise.all([loadDeviceFacts(), loadLive()]);
}

// Counts and flags an event cannot settle alone (a device's other alerts, an event that raced
// a snapshot) are read again once alert events pause: one request per view, never per event.
let settleTimer = 0;
function settleLater() {
  clearTimeout(settleTimer);
  settleTimer = setTimeout(async () => {
    const view = currentView();
    if (view === "overview") {
      const o = await act(() => client.getOverview({ site_id: state.site || undefined }));
      if (o) applyOverview(o);
      await loadDevices();
    }
    if (state.device) await loadDeviceFacts();
  }, 5000);
}

// -------------------------------------------------------------- overview ----
function applyOverview(o) {
  state.offlineAfterS = o.offline_after_s ?? state.offlineAfterS;
  state.overview = o;
  state.severityCounts = { ...o.alerts };
  state.unread = o.unread_notifications;
  const select = $("#site-scope");
  const options = [new Option("All sites", ""), ...o.sites.map((s) => new Option(s.site_id))];
  if (state.site && !o.sites.some((s) => s.site_id === state.site)) {
    options.push(new Option(state.site));
  }
  select.replaceChildren(...options);
  select.value = state.site;
  schedule(renderCounts);
  schedule(renderBadge);
  state.ready = true;
}

function renderCounts() {
  const o = state.overview;
  if (!o) return;
  const tile = (label, value, cls) => el("div", { class: "tile" }, el("b", { class: cls, text: String(value) }), label);
  $("#counts").replaceChildren(
    tile("devices", o.devices.total),
    tile("online", o.devices.online, "s-online"),
    tile("offline", o.devices.offline, "s-offline"),
    tile("alerting", o.devices.alerting, "s-alerting"),
    ...SEVERITIES.map((s) => tile(`${s} alerts`, state.severityCounts[s] ?? 0, s)),
  );
}

function renderBadge() {
  const link = $("#notif-badge");
  link.dataset.unread = String(state.unread);
  link.querySelector(".count").textContent = String(state.unread);
  link.setAttribute("aria-label", `Notifications: ${state.unread} unread`);
}

function deviceFilters() {
  const form = new FormData($("#device-filters"));
  return {
    site_id: state.site || undefined,
    device_type: form.get("device_type") || undefined,
    status: form.get("status") || undefined,
  };
}

async function loadDevices(more = false) {
  const page = await act(() => client.listDevices({
    ...deviceFilters(), limit: 100, cursor: more ? state.devicesCursor : undefined,
  }));
  if (!page) return;
  if (!more) state.devices.clear();
  for (const d of page.items) {
    state.devices.set(d.device_id, d);
    const values = state.spark.get(d.device_id);
    const v = d.latest && d.latest[$("#device-filters [name=metric]").value];
    if (!values && v !== null && v !== undefined) state.spark.set(d.device_id, [v]);
  }
  state.devicesCursor = page.next_cursor;
  $("#more-devices").hidden = !page.next_cursor;
  schedule(renderDevices);
}
$("#more-devices").addEventListener("click", () => loadDevices(true));
$("#device-filters").addEventListener("change", (event) => {
  if (event.target.name === "metric") {
    state.spark.clear();
    for (const d of state.devices.values()) {
      const v = d.latest && d.latest[event.target.value];
      if (v !== null && v !== undefined) state.spark.set(d.device_id, [v]);
    }
    schedule(renderDevices);
  } else {
    loadDevices();
  }
});

function deviceStatus(d) {
  if (d.alerting) return "alerting";
  return d.last_seen && age(d.last_seen) <= state.offlineAfterS ? "online" : "offline";
}

function sparkline(values) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 110 26");
  svg.setAttribute("role", "img");
  if (!values || !values.length) {
    svg.setAttribute("aria-label", "no recent values");
    return svg;
  }
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const span = hi - lo || 1;
  const step = values.length > 1 ? 108 / (SPARK_POINTS - 1) : 0;
  const start = 110 - 1 - step * (values.length - 1);
  const points = values.map((v, i) => `${(start + i * step).toFixed(1)},${(24 - ((v - lo) / span) * 22).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.length === 1 ? `0,${points[0].split(",")[1]} ${points[0]}` : points.join(" "));
  svg.append(line);
  svg.setAttribute("aria-label", `${values.length} recent values, last ${fmt(values.at(-1), 2)}`);
  return svg;
}

function deviceRow(d) {
  const m = d.latest || {};
  const status = deviceStatus(d);
  return el("tr", { "data-device": d.device_id },
    el("td", {}, deviceLink(d.device_id)),
    el("td", { text: d.site_id }),
    el("td", { text: d.device_type }),
    el("td", {}, badge(status, `s-${status}`)),
    el("td", { class: "num", text: fmt(m.power_kw, 2) }),
    el("td", { class: "num", text: fmt(m.soc_pct) }),
    el("td", { class: "num", text: fmt(m.voltage_v) }),
    el("td", { class: "num", text: fmt(m.frequency_hz, 2) }),
    el("td", { class: "num", text: fmt(m.temperature_c) }),
    el("td", {}, sparkline(state.spark.get(d.device_id))),
    el("td", { text: when(d.last_seen) }),
  );
}

function renderDevices() {
  if (currentView() !== "overview") return;
  const rows = [...state.devices.values()].map(deviceRow);
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colspan: "11", class: "muted", text: "No devices match." })));
  }
  $("#devices").replaceChildren(...rows);
}

function onLatest(r) {
  const metric = $("#device-filters [name=metric]").value;
  let d = state.devices.get(r.device_id);
  const filters = deviceFilters();
  if (!d && !state.devicesCursor && (!filters.device_type || filters.device_type === r.device_type)
      && (!filters.status || filters.status === "online")) {
    d = { device_id: r.device_id, site_id: r.site_id, device_type: r.device_type, alerting: false };
    state.devices.set(r.device_id, d);
  }
  if (d) {
    d.latest = r;
    if (!d.last_seen || Date.parse(r.ts) > Date.parse(d.last_seen)) d.last_seen = r.ts;
    const v = r[metric];
    if (v !== null && v !== undefined) {
      const values = state.spark.get(r.device_id) || [];
      values.push(v);
      if (values.length > SPARK_POINTS) values.shift();
      state.spark.set(r.device_id, values);
    }
    schedule(renderDevices);
  }
  const page = state.device;
  if (page && page.id === r.device_id) {
    page.live.add(r);
    if (page.device) {
      page.device.latest = r;
      schedule(renderDeviceFacts);
    }
  }
}

// --------------------------------------------------------------- alerts ----
const groupKey = (a) => `${a.rule_id}|${a.site_id}|${a.severity}`;
const UNACKED = new Set(["active_unacknowledged", "cleared_unacknowledged"]);
// An alert event carries the alert after the change; the change tells what it was before.
function previous(a, name) {
  if (name === "alert.opened") return null;
  if (name === "alert.acknowledged") {
    return a.status === "cleared" ? "cleared_unacknowledged" : "active_unacknowledged";
  }
  return a.status === "cleared" ? "active_acknowledged" : "active_unacknowledged"; // alert.cleared
}
function matchesStatus(status, wanted) {
  return wanted === "open" ? status !== "cleared" : status === wanted;
}

function alertFilter() {
  if (currentView() !== "alerts") return { status: "open" };
  const form = new FormData($("#alert-filters"));
  return {
    status: form.get("status") || "open",
    severity: form.get("severity") || undefined,
    device_id: form.get("device_id") || undefined,
  };
}

let groupsAsked = 0;
async function loadAlertGroups(target) {
  const filter = alertFilter();
  const asked = ++groupsAsked;
  const body = await act(() => client.listAlertGroups({ ...filter, site_id: state.site || undefined }));
  if (!body) {
    state.ready = false; // not read (the API away): read the views again once the stream opens
    return;
  }
  if (asked !== groupsAsked) return; // a later request (another view, filter) wins
  const groups = new Map();
  for (const g of body.items) groups.set(groupKey(g), { ...g });
  state.alerts = { filter, groups, open: new Map(), target };
  schedule(renderGroups);
}

$("#alert-filters").addEventListener("submit", (event) => {
  event.preventDefault();
  loadAlertGroups("#alert-groups");
});

function matchesFilter(a, status, filter) {
  return matchesStatus(status, filter.status)
    && (!filter.severity || filter.severity === a.severity)
    && (!filter.device_id || filter.device_id === a.device_id);
}

function onAlert(a, name) {
  const seen = `${name}:${a.id}`;
  if (!state.ready || state.applied.has(seen)) return;
  if (state.applied.size > 100_000) state.applied.clear();
  state.applied.add(seen);
  const before = previous(a, name);
  // open alerts by severity (the overview's tiles)
  const wasOpen = before !== null && before !== "cleared";
  state.severityCounts[a.severity] = Math.max(0,
    state.severityCounts[a.severity] + (a.status !== "cleared") - wasOpen);
  schedule(renderCounts);
  const row = state.devices.get(a.device_id);
  if (row && name === "alert.opened") {
    row.alerting = true;
    schedule(renderDevices);
  }
  settleLater(); // a clear leaves the device alerting if it has other active alerts
  if (state.device && state.device.id === a.device_id) {
    if (name === "alert.opened" && state.device.device) state.device.device.alerting = true;
    state.device.alerts.set(a.id, a);
    schedule(renderDeviceAlerts);
  }
  const view = state.alerts;
  if (!view) return;
  const was = before !== null && matchesFilter(a, before, view.filter);
  const now = matchesFilter(a, a.status, view.filter);
  const key = groupKey(a);
  let group = view.groups.get(key);
  if (!group && now) {
    group = {
      rule_id: a.rule_id, rule_name: state.rules.get(a.rule_id) || a.rule_id, site_id: a.site_id,
      severity: a.severity, count: 0, unacknowledged: 0,
    };
    view.groups.set(key, group);
  }
  if (group) {
    group.count = Math.max(0, group.count + now - was);
    group.unacknowledged = Math.max(0, group.unacknowledged
      + (now && UNACKED.has(a.status)) - (was && UNACKED.has(before)));
    group.last_opened_at = group.last_opened_at > a.opened_at ? group.last_opened_at : a.opened_at;
    const open = view.open.get(key);
    if (open) {
      if (now) open.items.set(a.id, a);
      else open.items.delete(a.id);
    }
    if (!group.count && !open) view.groups.delete(key);
  }
  schedule(renderGroups);
}

const RANK = Object.fromEntries(SEVERITIES.map((s, i) => [s, i]));
function renderGroups() {
  const view = state.alerts;
  if (!view) return;
  const target = $(view.target);
  const groups = [...view.groups.entries()].sort(([, a], [, b]) =>
    RANK[a.severity] - RANK[b.severity] || b.count - a.count);
  if (!groups.length) {
    target.replaceChildren(el("p", { class: "muted", text: "No alerts match." }));
    return;
  }
  target.replaceChildren(...groups.map(([key, g]) => groupBlock(key, g, view)));
}

function groupBlock(key, g, view) {
  const open = view.open.get(key);
  const bodyId = `group-${btoa(unescape(encodeURIComponent(key))).replace(/[^a-zA-Z0-9]/g, "")}`;
  const head = el("div", { class: "group-head" },
    el("button", {
      type: "button", class: "expand", "aria-expanded": open ? "true" : "false",
      "aria-controls": bodyId, onclick: () => toggleGroup(key, g),
    }, el("strong", { text: g.rule_name }), ` · ${g.site_id}`),
    badge(g.severity, g.severity),
    el("span", { class: "group-count", text: `${g.count} alert${g.count === 1 ? "" : "s"}` }),
    el("span", { class: "muted", text: `${g.unacknowledged} unacknowledged` }),
    canAct() && g.unacknowledged > 0
      ? el("button", { type: "button", onclick: (e) => ackGroup(g, view.filter, e.target),
        text: "Acknowledge all", "aria-label": `Acknowledge all ${g.rule_name} alerts of ${g.site_id}` })
      : null,
  );
  const block = el("div", { class: "group", "data-group": key }, head);
  if (open) block.append(groupBody(bodyId, open));
  return block;
}

function groupBody(id, open) {
  const rows = [...open.items.values()]
    .sort((a, b) => (a.opened_at < b.opened_at ? 1 : -1))
    .map(alertRow);
  const table = el("table", {},
    el("caption", { class: "sr-only", text: "Alerts of this group" }),
    el("thead", {}, el("tr", {}, ...["Device", "Alert", "Opened", "Status", "Acknowledged", "Action"]
      .map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...rows));
  const more = open.cursor
    ? el("button", { type: "button", text: "Show more", onclick: () => moreOfGroup(open) }) : null;
  return el("div", { class: "group-body scroll", id }, table, more);
}

function alertRow(a) {
  return el("tr", { "data-alert": a.id },
    el("td", {}, deviceLink(a.device_id)),
    el("td", { text: a.message }),
    el("td", { text: when(a.opened_at) }),
    el("td", { text: a.status.replaceAll("_", " ") }),
    el("td", { text: a.acknowledged_at ? `${a.acknowledged_by} at ${when(a.acknowledged_at)}` : "–" }),
    el("td", {}, canAct() && !a.acknowledged_at
      ? el("button", { type: "button", text: "Acknowledge", onclick: (e) => ackOne(a, e.target) })
      : null),
  );
}

async function toggleGroup(key, g) {
  const view = state.alerts;
  if (view.open.has(key)) {
    view.open.delete(key);
    schedule(renderGroups);
    return;
  }
  const open = { group: g, items: new Map(), cursor: null };
  view.open.set(key, open);
  await moreOfGroup(open);
}

async function moreOfGroup(open) {
  const view = state.alerts;
  const page = await act(() => client.listAlerts({
    rule_id: open.group.rule_id, site_id: open.group.site_id, severity: open.group.severity,
    status: view.filter.status, device_id: view.filter.device_id, cursor: open.cursor || undefined,
    limit: 200,
  }));
  if (!page) return;
  for (const a of page.items) if (!open.items.has(a.id)) open.items.set(a.id, a);
  open.cursor = page.next_cursor;
  schedule(renderGroups);
}

async function ackOne(a, button) {
  button.disabled = true;
  const done = await act(() => client.ackAlert({ alert_id: a.id }));
  if (!done) button.disabled = false;
  // the alert.acknowledged event updates the row
}

async function ackGroup(g, filter, button) {
  button.disabled = true;
  const body = { rule_id: g.rule_id, site_id: g.site_id, severity: g.severity, status: "open" };
  if (filter.status === "active_unacknowledged" || filter.status === "cleared_unacknowledged") {
    body.status = filter.status;
  }
  if (filter.device_id) body.device_id = filter.device_id;
  const answer = await act(() => client.ackAlerts({ body }));
  if (answer) say(`${answer.acknowledged.length} alerts acknowledged${answer.more ? "; more remain" : ""}.`);
}

// -------------------------------------------------------- notifications ----
function onNotification(n, name) {
  const seen = `${name}:${n.id}`;
  if (!state.ready || state.applied.has(seen)) return;
  state.applied.add(seen);
  state.unread = Math.max(0, state.unread + (name === "notification.created" ? 1 : -1));
  schedule(renderBadge);
  if (currentView() === "notifications") {
    state.notifications.set(n.id, n);
    if (state.notifications.size > 400) {
      const oldest = [...state.notifications.values()]
        .sort((x, y) => (x.created_at < y.created_at ? -1 : 1)).slice(0, 200);
      for (const old of oldest) state.notifications.delete(old.id);
    }
    schedule(renderNotifications);
  }
}

async function loadNotifications() {
  const page = await act(() => client.listNotifications({ site_id: state.site || undefined, limit: 100 }));
  if (!page) return;
  state.notifications = new Map(page.items.map((n) => [n.id, n]));
  schedule(renderNotifications);
}

function renderNotifications() {
  if (currentView() !== "notifications") return;
  const items = [...state.notifications.values()]
    .sort((a, b) => (a.created_at < b.created_at ? 1 : -1)).slice(0, 200);
  $("#notification-list").replaceChildren(...items.map((n) => el("tr",
    { "data-notification": n.id, class: n.read ? "" : "unread" },
    el("td", { text: when(n.created_at) }),
    el("td", {}, deviceLink(n.device_id)),
    el("td", { text: n.title }),
    el("td", {}, n.read ? document.createTextNode(`read by ${n.acked_by}`)
      : canAct() ? el("button", { type: "button", text: "Mark read", onclick: (e) => {
        e.target.disabled = true;
        act(() => client.ackNotification({ notification_id: n.id }));
      } }) : document.createTextNode("unread")),
  )));
}

// ---------------------------------------------------------- device page ----
async function openDevice(id) {
  if (state.device && state.device.id === id) return;
  closeDevice();
  state.device = {
    id, device: null, alerts: new Map(), commands: new Map(),
    live: liveChart($("#live-chart"), LIVE_WINDOW_S), history: null,
  };
  const page = state.device;
  $("#device-title").textContent = id;
  $("#device-facts").textContent = "";
  const [found, alerts, commands] = await Promise.all([
    loadDeviceFacts(),
    act(() => client.listAlerts({ device_id: id, limit: 50 })),
    act(() => client.listCommands({ device_id: id, limit: 20 })),
  ]);
  if (!found || state.device !== page) return; // not found, or another page meanwhile
  if (alerts) for (const a of alerts.items) page.alerts.set(a.id, a);
  if (commands) for (const c of commands.items) page.commands.set(c.id, c);
  schedule(renderDeviceAlerts);
  schedule(renderCommands);
  buildControl();
  await Promise.all([loadLive(), loadHistory()]);
}

async function loadDeviceFacts() {
  const page = state.device;
  const d = await act(() => client.getDevice({ device_id: page.id }), (m) => {
    $("#device-facts").textContent = m;
  });
  if (!d || state.device !== page) return false;
  page.device = d;
  schedule(renderDeviceFacts);
  return true;
}

function renderDeviceFacts() {
  const page = state.device;
  if (!page || !page.device) return;
  const d = page.device;
  const status = deviceStatus({ ...d, last_seen: d.latest ? d.latest.ts : d.last_seen });
  $("#device-facts").replaceChildren(`${d.device_type} at ${d.site_id} · `, badge(status, `s-${status}`),
    ` · last reading ${when(d.latest ? d.latest.ts : d.last_seen)}`);
  const m = d.latest || {};
  $("#device-latest").replaceChildren(...METRICS.filter((k) => m[k] !== null && m[k] !== undefined)
    .map((k) => el("div", { class: "tile" }, el("b", { text: fmt(m[k], 2) }), k)));
}

const metric = () => $("#chart-metric").value;
$("#chart-metric").addEventListener("change", () => {
  loadLive();
  loadHistory();
});

async function loadLive() {
  const page = state.device;
  if (!page) return;
  const to = new Date();
  const from = new Date(to.getTime() - LIVE_WINDOW_S * 1000);
  const series = await act(() => client.getReadings({
    device_id: page.id, from: from.toISOString(), to: new Date(to.getTime() + 1000).toISOString(),
    points: 300, metrics: metric(),
  }));
  if (series && state.device === page) page.live.reset(metric(), series);
}

async function loadHistory() {
  const page = state.device;
  if (!page) return;
  const form = new FormData($("#history-range"));
  let from;
  let to;
  if (form.get("range") === "custom") {
    from = new Date(form.get("from"));
    to = new Date(form.get("to"));
    if (Number.isNaN(from.getTime()) || Number.isNaN(to.getTime()) || from >= to) {
      $("#history-note").textContent = "Choose a start before the end.";
      return;
    }
  } else {
    to = new Date();
    from = new Date(to.getTime() - Number(form.get("range")) * 1000);
  }
  $("#history-note").textContent = "";
  const series = await act(() => client.getReadings({
    device_id: page.id, from: from.toISOString(), to: to.toISOString(), points: 300, metrics: metric(),
  }), (m) => { $("#history-note").textContent = m; });
  if (!series || state.device !== page) return;
  if (page.history) page.history.destroy();
  page.history = historyChart($("#history-chart"), metric(), series);
  $("#history-note").textContent = `${series.points.length} buckets of ${series.bucket_s} s (min, mean, max)`;
}
$("#history-range").addEventListener("submit", (event) => {
  event.preventDefault();
  loadHistory();
});
$("#history-range").addEventListener("change", (event) => {
  if (event.target.name === "range" && event.target.value !== "custom") loadHistory();
});

function renderDeviceAlerts() {
  const page = state.device;
  if (!page) return;
  const items = [...page.alerts.values()].sort((a, b) => (a.opened_at < b.opened_at ? 1 : -1));
  $("#device-alerts").replaceChildren(...items.map((a) => el("tr", { "data-alert": a.id },
    el("td", {}, badge(a.severity, a.severity)),
    el("td", { text: a.message }),
    el("td", { text: when(a.opened_at) }),
    el("td", { text: a.status.replaceAll("_", " ")
      + (a.acknowledged_by ? ` by ${a.acknowledged_by} at ${when(a.acknowledged_at)}` : "") }),
    el("td", {}, canAct() && !a.acknowledged_at
      ? el("button", { type: "button", text: "Acknowledge", onclick: (e) => ackOne(a, e.target) })
      : null),
  )));
}

function lifecycle(c) {
  if (c.status === "failed" && c.reason === "timeout") return badge("timed out", "s-timeout");
  if (c.status === "failed") return badge(`failed: ${c.reason || "no reason given"}`, "s-failed");
  return badge(c.status, `s-${c.status}`);
}

function renderCommands() {
  const page = state.device;
  if (!page) return;
  const items = [...page.commands.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  $("#device-commands").replaceChildren(...items.map((c) => el("tr", { "data-command": c.id },
    el("td", { text: when(c.created_at) }),
    el("td", { text: `${c.command} ${Object.entries(c.params || {}).map(([k, v]) => `${k}=${v}`).join(" ")}` }),
    el("td", { text: c.requested_by }),
    el("td", { class: "lifecycle" }, lifecycle(c)),
    el("td", { text: (c.history || []).map((h) => h.status).join(" → ") }),
  )));
}

function onCommand(c) {
  const page = state.device;
  if (!page || page.id !== c.device_id) return;
  const known = page.commands.get(c.id);
  if (known && known.history && c.history && known.history.length > c.history.length) return;
  page.commands.set(c.id, { ...known, ...c });
  schedule(renderCommands);
}

// The form is built from the catalogue: the commands this device's type accepts, a number
// input with its range per parameter; the browser checks the ranges before anything is sent.
// One key per distinct request: a retry or a double click of the same command reuses it (the
// API returns the command it made first), another command or device gets a new one.
let pending = { key: null, what: null };
function keyFor(what) {
  if (pending.what !== what) {
    const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs HTTPS
    pending = { key: [...bytes].map((b) => b.toString(16).padStart(2, "0")).join(""), what };
  }
  return pending.key;
}
function buildControl() {
  const page = state.device;
  const form = $("#control");
  if (!canAct() || !page.device || !state.catalogue) return;
  const commands = state.catalogue.device_types[page.device.device_type] || {};
  const select = form.querySelector("[name=command]");
  select.replaceChildren(...Object.keys(commands).map((name) => new Option(name)));
  form.elements.ttl_s.placeholder = String(state.catalogue.default_ttl_s);
  if (state.catalogue.max_ttl_s) form.elements.ttl_s.max = String(state.catalogue.max_ttl_s);
  const params = () => {
    const spec = commands[select.value] || {};
    $("#control-params").replaceChildren(...Object.entries(spec).map(([name, range]) =>
      el("label", {}, `${name} (${range.min} to ${range.max})`,
        el("input", { name: `param:${name}`, type: "number", step: "any", required: true,
          min: String(range.min), max: String(range.max) }))));
  };
  select.onchange = params;
  params();
  $("#control-message").textContent = "";
}

$("#control").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  if (!form.reportValidity()) return;
  const page = state.device;
  const params = {};
  for (const input of form.querySelectorAll("[name^='param:']")) {
    params[input.name.slice(6)] = Number(input.value);
  }
  const body = { device_id: page.id, command: form.elements.command.value, params };
  if (form.elements.ttl_s.value) body.ttl_s = Number(form.elements.ttl_s.value);
  const button = form.querySelector("button[type=submit]");
  button.disabled = true; // and a retry of this submission carries the same key: one command
  const key = keyFor(JSON.stringify(body));
  const answer = await act(() => client.sendCommand({ "Idempotency-Key": key, body }),
    (m) => { $("#control-message").textContent = m; });
  button.disabled = false;
  if (!answer) return;
  pending = { key: null, what: null }; // answered: the next submission is a new command
  $("#control-message").textContent = `Command ${answer.id.slice(0, 8)} ${answer.status}.`;
  if (!page.commands.has(answer.id)) {
    page.commands.set(answer.id, { id: answer.id, device_id: page.id, ...body, status: answer.status,
      requested_by: state.user, created_at: new Date().toISOString(),
      history: [{ status: answer.status }] });
    schedule(renderCommands);
  }
});

function closeDevice() {
  if (!state.device) return;
  state.device.live.destroy();
  if (state.device.history) state.device.history.destroy();
  state.device = null;
}

// ---------------------------------------------------------------- routing ----
function currentView() {
  const hash = location.hash || "#/";
  if (hash.startsWith("#/devices/")) return "device";
  if (hash === "#/alerts") return "alerts";
  if (hash === "#/notifications") return "notifications";
  return "overview";
}

// afterShared: the overview was just read (loadShared)
async function route(afterShared = false) {
  if (!state.token) return;
  const view = currentView();
  delete document.body.dataset.view; // set again once the view has what it shows
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== view;
  for (const link of document.querySelectorAll("#nav a")) {
    const here = link.getAttribute("href") === (location.hash || "#/");
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view !== "device") closeDevice();
  if (view === "overview") {
    const [o] = await Promise.all([
      afterShared ? null : act(() => client.getOverview({ site_id: state.site || undefined })),
      loadDevices(),
      loadAlertGroups("#overview-alerts"),
    ]);
    if (o) applyOverview(o);
  } else if (view === "alerts") {
    await loadAlertGroups("#alert-groups");
  } else if (view === "notifications") {
    await loadNotifications();
  } else {
    await openDevice(decodeURIComponent(location.hash.slice("#/devices/".length)));
  }
  if (currentView() === view) document.body.dataset.view = view;
}
window.addEventListener("hashchange", () => route());

// devices that stop reporting turn offline on screen without a request
setInterval(() => {
  if (currentView() === "overview" && state.devices.size) schedule(renderDevices);
  if (state.device) schedule(renderDeviceFacts);
}, 5000);

if (state.token && !tokenExpired()) start();
else showLogin(state.token ? "Session expired: log in again." : "");
