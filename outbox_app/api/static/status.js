// The status page: asks for the API key once per tab, keeps it in sessionStorage, and reads
// /v1/status (every 2 s) and /v1/search with it as an Authorization header. Data is put
// into the page as text only, never as markup.
"use strict";

const KEY = "outbox-api-key";
const REFRESH_MS = 2000;
let generation = 0; // bumped when the key changes: an answer for an older key is dropped
let timer = null;

const $ = (id) => document.getElementById(id);

class KeyRefused extends Error {}

async function api(path) {
  const response = await fetch(path, {
    headers: {Authorization: "Bearer " + sessionStorage.getItem(KEY)},
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  const message = body && body.error ? body.error.message : "HTTP " + response.status;
  if (response.status === 401) throw new KeyRefused(message);
  if (!response.ok) throw new Error(message);
  return body;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 120) return value.toFixed(1) + " s";
  if (value < 7200) return (value / 60).toFixed(1) + " min";
  return (value / 3600).toFixed(1) + " h";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "-";
}

function row(values, attrs) {
  const tr = document.createElement("tr");
  for (const [value, cls] of values) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "-" : String(value);
    if (cls) td.className = cls;
    tr.append(td);
  }
  for (const [name, value] of Object.entries(attrs || {})) tr.setAttribute(name, value);
  return tr;
}

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  if (rows.length) {
    body.replaceChildren(...rows);
    return;
  }
  const td = document.createElement("td");
  td.colSpan = $(tableId).tHead ? $(tableId).tHead.rows[0].cells.length : 2;
  td.className = "muted";
  td.textContent = empty;
  const tr = document.createElement("tr");
  tr.append(td);
  body.replaceChildren(tr);
}

function render(s) {
  $("scope").textContent = "org " + s.org;
  const badge = $("badge");
  badge.hidden = false;
  badge.textContent = s.healthy ? "healthy" : "needs attention";
  badge.className = "badge " + (s.healthy ? "ok" : "bad");
  $("updated").textContent = "updated " + new Date(s.generated_at).toLocaleTimeString();

  $("attention-panel").hidden = s.healthy;
  $("attention").replaceChildren(...s.attention.map((line) => {
    const li = document.createElement("li");
    li.textContent = line;
    return li;
  }));

  const unknown = (part) => "unknown: " + (s.unavailable[part] || "its service is down");
  fill("images", (s.images || []).map((i) => row(
    [[i.state], [i.count, "num"], [i.entered_last_minute, "num"]],
    {"data-state": i.state, class: i.count ? "" : "zero"})), unknown("images"));
  fill("projectors", (s.projectors || []).map((p) => row([
    [p.name],
    [(p.behind_at_least ? "≥" : "") + p.behind, "num"],
    [seconds(p.oldest_waiting_s), "num"],
    [p.events_per_s === null ? "-" : p.events_per_s, "num"],
    [p.committed, "num"],
  ], {"data-projector": p.name})), unknown("log positions"));

  const r = s.relay;
  fill("relay", r ? [
    row([["slot"], [r.slot || "(none)"]]),
    row([["acknowledged"], [(r.acked_lsn || "-") + " (commit " + when(r.acked_commit_at) + ")"]]),
    row([["lag"], [r.lag_bytes === null ? "-" : bytes(r.lag_bytes) + " of WAL not confirmed"]]),
    row([["waiting"], [r.waiting_events + " events, oldest " + seconds(r.oldest_waiting_s)]]),
    row([["leader"], [r.leader ? "yes" : "none"]]),
  ] : [], unknown("relay"));

  const a = s.continuous_audit;
  const drift = a ? Object.entries(a.open).map(([k, n]) => k + " " + n).join(", ") : "";
  fill("audit", a ? [
    row([["last pass"], [when(a.last_pass_at) + " (" + seconds(a.last_pass_s) + ")"]]),
    row([["images judged"], [a.rows]]),
    row([["drift found"], [drift || "none", drift ? "bad" : "ok"]], {"data-audit": "open"}),
    row([["passes"], [a.passes]]),
    row([["last sweep"], [seconds(a.last_sweep_s)]]),
  ] : [], s.unavailable["continuous audit"] ? unknown("continuous audit") : "no pass yet");

  fill("services", s.services.map((v) => row(
    [[v.name], [v.ok ? "up" : "down: " + v.error, v.ok ? "ok" : "bad"]],
    {"data-service": v.name})), "-");

  const overdue = s.overdue ? s.overdue.items : [];
  fill("overdue", overdue.map((o) => row(
    [[o.id, "id"], [o.state], [when(o.deadline_at)], [seconds(o.overdue_s), "num"]],
    {"data-image": o.id})), s.overdue ? "none" : unknown("images"));

  const failures = s.failures ? s.failures.items : [];
  fill("failures", failures.map((f) => row(
    [[f.id, "id"], [f.state], [f.attempts, "num"], [f.error, "error"], [when(f.at)]],
    {"data-image": f.id})), s.failures ? "none" : unknown("images"));

  fill("dead-letters", (s.dead_letters || []).map((d) => row(
    [[d.topic], [d.letters, "num"], [d.not_replayed, d.not_replayed ? "num bad" : "num"]],
    {"data-topic": d.topic})), s.dead_letters ? "none" : unknown("log positions"));
}

async function refresh() {
  const mine = generation;
  try {
    const status = await api("/v1/status");
    if (mine !== generation) return;
    render(status);
    $("problem").hidden = true;
  } catch (error) {
    if (mine !== generation) return;
    if (error instanceof KeyRefused) {
      forget("The key was refused: " + error.message);
      return;
    }
    $("problem").hidden = false;
    $("problem").textContent = "Could not refresh: " + error.message;
  }
  if (mine === generation) timer = setTimeout(refresh, REFRESH_MS);
}

function start() {
  generation += 1;
  clearTimeout(timer);
  $("key-panel").hidden = true;
  $("dashboard").hidden = false;
  $("forget").hidden = false;
  refresh();
}

function forget(message) {
  generation += 1;
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  $("dashboard").hidden = true;
  $("forget").hidden = true;
  $("badge").hidden = true;
  $("scope").textContent = "";
  $("updated").textContent = "";
  $("key-panel").hidden = false;
  $("key-error").textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

async function search(event) {
  event.preventDefault();
  const params = new URLSearchParams({q: $("q").value, mode: $("mode").value, limit: "10"});
  $("search-summary").textContent = "searching…";
  try {
    const page = await api("/v1/search?" + params);
    $("search-summary").textContent = page.total + " found (" + page.mode + ")";
    $("results").replaceChildren(...page.items.map((hit) => {
      const li = document.createElement("li");
      li.dataset.image = hit.id;
      const title = document.createElement("strong");
      title.textContent = hit.title || "(untitled)";
      const meta = document.createElement("span");
      meta.className = "muted";
      meta.textContent = " " + hit.state + " · v" + hit.version + " · " + hit.id;
      const text = document.createElement("div");
      text.className = "snippet";
      text.textContent = (hit.ocr_text || "").slice(0, 160);
      li.append(title, meta, text);
      return li;
    }));
  } catch (error) {
    if (error instanceof KeyRefused) {
      forget("The key was refused: " + error.message);
      return;
    }
    $("search-summary").textContent = "Search failed: " + error.message;
    $("results").replaceChildren();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("key-error").textContent = "";
    start();
  });
  $("forget").addEventListener("click", () => forget(""));
  $("search-form").addEventListener("submit", search);
  if (sessionStorage.getItem(KEY)) start();
});
