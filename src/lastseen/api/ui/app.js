// The status page's script: reads GET /status every two seconds, and the dead-letter and
// object routes when asked. Every address is relative to the page (served at <prefix>/ui/),
// so the page works under any path prefix. Text from the service is only ever set as
// textContent: a dead letter's detail cannot become markup.
"use strict";

const REFRESH_MS = 2000;
const PAGE_SIZE = 25;
const base = new URL("../", document.baseURI);
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem("lastseen-token");
let timer = null;
let readOnly = false;
let deadTotal = null;
let deadCursor = null; // the `after` of the page shown; null for the first
let deadNext = null;

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", "Bearer " + token);
  const response = await fetch(new URL(path, base), { ...options, headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized();
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  return { status: response.status, ok: response.ok, body };
}

const count = (n) => (n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"));
const plural = (n, noun) => `${count(n)} ${noun}${n === 1 ? "" : "s"}`;
const rate = (n) => (n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(1)) + "/s";
function seconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
}
function set(id, text) {
  $(id).textContent = text;
}

function sparkline(svg, values) {
  const w = svg.clientWidth || 160;
  const h = svg.clientHeight || 28;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const known = values.map((v) => (v === null ? 0 : v));
  if (known.length < 2) return;
  const max = Math.max(...known) || 1;
  const step = w / (known.length - 1);
  const points = known.map((v, i) => `${(i * step).toFixed(1)},${(h - 1 - (v / max) * (h - 2)).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
}

function showState(s) {
  const ready = s.ready;
  const state = $("state");
  if (!ready.ready) {
    state.textContent = "not ready: " + ready.reason;
    state.className = "pill bad";
  } else if (ready.degraded) {
    state.textContent = "degraded: " + ready.degraded;
    state.className = "pill warn";
  } else {
    state.textContent = "ready";
    state.className = "pill ok";
  }
  const upstream = $("upstream");
  upstream.hidden = !("upstream" in ready) && !s.upstream_failing;
  upstream.textContent = s.upstream_failing
    ? "upstream failing (" + s.upstream_failure + ") at " + s.upstream_url + ": lookups held"
    : "upstream ok";
  upstream.title = s.upstream_url;
  upstream.className = "pill " + (s.upstream_failing ? "bad" : "ok");
  const spooling = $("spooling");
  spooling.hidden = !(s.spool && s.spool.spooling);
  spooling.textContent = "spooling to local disk";
}

function render(s) {
  readOnly = s.ui !== "full";
  document.body.classList.toggle("read-only", readOnly);
  set("instance", `${s.instance} · ${s.role}`);
  set("version", "lastseen " + s.version);
  set("updated", "updated " + new Date(s.at * 1000).toLocaleTimeString());
  showState(s);
  const t = s.totals;
  set("received", count(t.received));
  set("received-rate", rate(s.rates.received) + (t.rejected ? `, ${count(t.rejected)} refused` : ""));
  set("processed", count(t.processed));
  set("processed-rate", rate(s.rates.processed));
  set("pending", count(s.inbox.pending));
  set("oldest", s.inbox.oldest_age === null ? "none waiting" : "oldest " + seconds(s.inbox.oldest_age));
  set("in-flight", count(s.lookups_in_flight));
  set("active", plural(s.callbacks_active, "callback") + " held");
  set("lookup-rate", rate(s.rates.lookups));
  set("lookups", count(t.lookups) + " done");
  set("lag", seconds(s.latency.lag_over_upstream.p99));
  set("lag-p50", "p50 " + seconds(s.latency.lag_over_upstream.p50));
  set("online", count(s.objects_online));
  set("deleted", `deleted ${count(t.deleted_expired)} expired, ${count(t.deleted_offline)} offline`);
  set("retries", count(t.retries));
  set("retries-of", "of " + plural(t.lookups, "lookup") + " done");
  const reasons = Object.entries(s.dead_letters);
  const dead = reasons.reduce((sum, [, n]) => sum + n, 0);
  set("dead-total", count(dead));
  set("dead-reasons", reasons.map(([r, n]) => `${r} ${count(n)}`).join(", ") || "none stored");
  $("spool-tile").hidden = s.spool === null;
  if (s.spool) {
    set("spool", count(s.spool.callbacks));
    set("spool-detail", `${count(s.spool.bytes)} bytes, oldest ${seconds(s.spool.oldest_age)}`);
  }
  set("window", `last ${Math.round(s.window)} s`);
  const names = {
    lookup: "upstream lookup",
    lag_over_upstream: "lag over upstream",
    result_lag: "receipt to result",
    reply: "POST /callback reply",
  };
  const rows = Object.entries(names).map(([key, label]) => {
    const q = s.latency[key] || { p50: null, p99: null };
    const tr = document.createElement("tr");
    for (const [text, cls] of [[label, ""], [seconds(q.p50), "num"], [seconds(q.p99), "num"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    return tr;
  });
  $("latency").tBodies[0].replaceChildren(...rows);
  // history: [at, received/s, processed/s, lookups/s, pending, in flight, lag p99]
  const columns = { received: 1, processed: 2, lookups: 3, pending: 4, in_flight: 5, lag_p99: 6 };
  for (const [name, index] of Object.entries(columns)) {
    sparkline($("spark-" + name), s.history.map((p) => p[index]));
  }
  updateReasons(Object.keys(s.dead_letters));
  if (dead !== deadTotal) {
    deadTotal = dead;
    if (deadCursor === null) loadDeadLetters();
  }
}

function updateReasons(reasons) {
  const select = $("reason");
  const have = new Set([...select.options].map((o) => o.value));
  for (const reason of reasons.sort()) {
    if (!have.has(reason)) select.add(new Option(reason, reason));
  }
}

function showBanner(text) {
  const banner = $("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
}

function askToken(rejected) {
  clearTimeout(timer);
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !rejected;
  $("token").focus();
}

async function refresh() {
  clearTimeout(timer);
  try {
    const { ok, status, body } = await api("status");
    if (!ok) throw new Error(`GET status answered ${status}`);
    $("login").hidden = true;
    $("main").hidden = false;
    showBanner(null);
    render(body);
  } catch (e) {
    if (e instanceof Unauthorized) {
      askToken(token !== null);
      return;
    }
    showBanner("The service does not answer (" + e.message + "); trying again.");
    $("state").textContent = "unreachable";
    $("state").className = "pill bad";
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function filter() {
  const reason = $("reason").value;
  return reason ? { reason } : {};
}

function groups(letters) {
  // One row per callback and reason: the buttons act on exactly the letters of a row.
  const rows = new Map();
  for (const d of letters) {
    const key = d.callback_id + "\u0000" + d.reason;
    if (!rows.has(key)) rows.set(key, { ...d, ids: [] });
    rows.get(key).ids.push(d.object_id);
  }
  // The letters come newest received first; a row's ids read in their own order.
  for (const row of rows.values()) row.ids.sort((a, b) => a - b);
  return [...rows.values()];
}

function cell(text, cls, label) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (label) td.dataset.label = label;
  return td;
}

function button(text, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

async function loadDeadLetters() {
  const query = new URLSearchParams({ ...filter(), limit: String(PAGE_SIZE) });
  if (deadCursor) query.set("after", deadCursor);
  try {
    const { ok, body } = await api("dead-letters?" + query);
    if (!ok) {
      $("dead-message").textContent = body && body.detail ? body.detail : "could not list dead letters";
      return;
    }
    deadNext = body.next_after;
    const rows = groups(body.dead_letters).map((g) => {
      const tr = document.createElement("tr");
      const ids = g.ids.length > 6 ? g.ids.slice(0, 6).join(", ") + ` … (${g.ids.length})` : g.ids.join(", ");
      tr.append(
        cell(String(g.callback_id), "num", "Callback"),
        cell(new Date(g.received_at).toLocaleString(), "", "Received"),
        cell(g.reason, "", "Reason"),
        cell(ids, "", "Ids"),
        cell(String(g.attempts), "num", "Attempts"),
        cell(g.detail, "detail", "Detail"),
      );
      const actions = cell("", "write", "");
      const which = { callback_id: g.callback_id, reason: g.reason };
      actions.append(
        button("Retry", "", () => retry(which, `callback ${g.callback_id}`)),
        " ",
        button("Discard", "danger", () => discard(which, `callback ${g.callback_id}`)),
      );
      tr.appendChild(actions);
      tr.dataset.callback = String(g.callback_id);
      return tr;
    });
    $("dead").tBodies[0].replaceChildren(...rows);
    $("dead-empty").hidden = rows.length > 0;
    $("dead-next").disabled = !deadNext;
    $("dead-first").disabled = deadCursor === null;
  } catch (e) {
    if (e instanceof Unauthorized) askToken(true);
  }
}

async function act(path, which, what) {
  if (readOnly) return null;
  try {
    const { ok, body } = await api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(which),
    });
    if (!ok) {
      $("dead-message").textContent = `${what}: ${body && body.detail ? body.detail : "failed"}`;
      return null;
    }
    return body;
  } catch (e) {
    if (e instanceof Unauthorized) askToken(true);
    else $("dead-message").textContent = `${what}: the service does not answer`;
    return null;
  }
}

async function retry(which, what) {
  const include_stale = $("include-stale").checked;
  const body = await act("dead-letters/retry", { ...which, include_stale }, what);
  if (!body) return;
  const made = body.callbacks_created.length;
  let text = made
    ? `${what}: queued again as callback${made > 1 ? "s" : ""} ${body.callbacks_created.join(", ")}.`
    : `${what}: nothing queued.`;
  if (body.skipped_stale) {
    text += ` ${count(body.skipped_stale)} older than the TTL left alone (their results could no longer count; tick the box to retry them all the same).`;
  }
  $("dead-message").textContent = text;
  await afterAction();
}

async function discard(which, what) {
  if (!window.confirm(`Discard the dead letters of ${what}? Their ids will not be looked up again.`)) return;
  const body = await act("dead-letters/discard", which, what);
  if (!body) return;
  $("dead-message").textContent = `${what}: ${count(body.discarded)} dead letters discarded.`;
  await afterAction();
}

async function afterAction() {
  deadCursor = null;
  deadTotal = null;
  await loadDeadLetters();
  refresh();
}

async function findObject(event) {
  event.preventDefault();
  const id = $("object-id").value.trim();
  const out = $("object-result");
  if (!/^-?[0-9]+$/.test(id)) {
    out.textContent = "An object id is an integer.";
    return;
  }
  try {
    const { status, body } = await api("objects/" + id);
    if (status === 200) {
      const seen = new Date(body.last_seen);
      const ago = Math.max(0, (Date.now() - seen.getTime()) / 1000);
      out.textContent = `Object ${body.id} is online: last seen ${seen.toLocaleString()} (${seconds(ago)} ago).`;
    } else if (status === 404) {
      out.textContent = `Object ${id} is not online (not seen online within the TTL).`;
    } else {
      out.textContent = body && body.detail ? body.detail : `The service answered ${status}.`;
    }
  } catch (e) {
    if (e instanceof Unauthorized) askToken(true);
    else out.textContent = "The service does not answer.";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value;
    sessionStorage.setItem("lastseen-token", token);
    $("token").value = "";
    refresh();
    loadDeadLetters();
  });
  $("reason").addEventListener("change", () => {
    deadCursor = null;
    loadDeadLetters();
  });
  $("dead-next").addEventListener("click", () => {
    deadCursor = deadNext;
    loadDeadLetters();
  });
  $("dead-first").addEventListener("click", () => {
    deadCursor = null;
    loadDeadLetters();
  });
  $("retry-all").addEventListener("click", () => retry(filter(), $("reason").value || "all reasons"));
  $("discard-all").addEventListener("click", () => discard(filter(), $("reason").value || "all reasons"));
  $("object-search").addEventListener("submit", findObject);
  refresh();
});
