// The operator page: renders each board the server streams (GET /api/v1/stream, server-sent
// events) with Plotly (served from the plotly Python package, no CDN) and plain tables.
// No chart is drawn here by hand: every chart is a Plotly.react call on the server's series.
"use strict";

const $ = (id) => document.getElementById(id);
let lastBoard = 0;
const drawn = new Map(); // panel id -> the JSON it was last drawn from (unchanged: not redrawn)

function changed(id, value) {
  const text = JSON.stringify(value);
  if (drawn.get(id) === text) return false;
  drawn.set(id, text);
  return true;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function fillTable(table, rows, columns, rowClass) {
  table.replaceChildren();
  if (!rows.length) return;
  const cols = columns || [...new Set(rows.flatMap((r) => Object.keys(r)))];
  table.append(el("tr", {}, ...cols.map((c) => el("th", {}, c.replaceAll("_", " ")))));
  for (const row of rows) {
    const cells = cols.map((c) => el("td", { title: show(row[c]) }, show(row[c])));
    const tr = el("tr", rowClass ? { class: rowClass(row) } : {}, ...cells);
    table.append(tr);
  }
}

function setPanel(card, messageNode, panel) {
  card.classList.remove("ok", "empty", "waiting", "error");
  card.classList.add(panel.status);
  messageNode.textContent = panel.message || "";
}

function evidence(obj) {
  const details = el("details", {}, el("summary", {}, "evidence"));
  details.append(el("pre", {}, JSON.stringify(obj, null, 2)));
  return details;
}

// ----------------------------------------------------------------------------- charts

function chartCard(chart) {
  let card = $("chart-" + chart.id);
  if (!card) {
    card = el("section", { class: "card", id: "chart-" + chart.id },
      el("h2", {}, chart.title, " ", el("span", { class: "muted" }, "(" + chart.unit + ")")),
      el("p", { class: "message" }),
      el("div", { class: "chart" }));
    $("charts").append(card);
  }
  return card;
}

function renderChart(chart) {
  if (!changed("chart-" + chart.id, chart)) return;
  const card = chartCard(chart);
  setPanel(card, card.querySelector(".message"), chart);
  card.dataset.points = String(chart.series.reduce((n, s) => n + s.y.filter((v) => v !== null).length, 0));
  const plot = card.querySelector(".chart");
  plot.style.display = chart.series.length ? "" : "none";
  if (!chart.series.length) return;
  const traces = chart.series.map((s) => ({
    x: s.t.map((t) => new Date(t * 1000)), y: s.y, name: s.name, type: "scatter", mode: "lines",
    connectgaps: false,
  }));
  Plotly.react(plot, traces, {
    margin: { l: 48, r: 8, t: 6, b: 28 }, showlegend: true,
    legend: { orientation: "h", y: -0.15, font: { size: 11 } },
    yaxis: { rangemode: "tozero", title: { text: chart.unit, font: { size: 11 } } },
    xaxis: { type: "date", tickformat: "%H:%M" }, uirevision: chart.id,
  }, { displayModeBar: false, responsive: true });
}

// ----------------------------------------------------------------------------- panels

function renderModels(models) {
  if (!changed("models", models)) return;
  setPanel($("models"), $("models-message"), models);
  $("production-version").textContent =
    models.production_version === null || models.production_version === undefined
      ? "none" : models.model_name + " v" + models.production_version;
  fillTable($("models-table"), models.versions,
    ["version", "stage", "aliases", "traffic_percent", "observed_per_s", "threshold", "gate", "created_at", "run_id"],
    (row) => (row.aliases.includes("production") ? "production" : ""));
}

function renderQuality(quality) {
  if (!changed("quality", quality)) return;
  setPanel($("quality"), $("quality-message"), quality);
  fillTable($("quality-table"), quality.rows);
}

function renderDrift(drift) {
  if (!changed("drift", drift)) return;
  setPanel($("drift"), $("drift-message"), drift);
  fillTable($("drift-signals"), drift.signals);
  const list = $("drift-events");
  list.replaceChildren();
  for (const event of drift.events) {
    list.append(el("li", { class: "drift-event", "data-event-id": event.event_id || "" },
      el("span", { class: "kind drift" }, event.detector || "drift"),
      `${event.signal}: ${show(event.statistic)} vs threshold ${show(event.threshold)}`
        + ` (v${event.model_version || "?"}, ${event.detected_at || ""})`,
      evidence(event)));
  }
  if (!drift.events.length) list.append(el("li", { class: "muted" }, "no drift event so far"));
}

function renderLoop(loop) {
  if (!changed("loop", loop)) return;
  setPanel($("loop"), $("loop-message"), loop);
  $("loop-state").textContent = loop.state;
  const list = $("timeline");
  const open = new Set([...list.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  list.replaceChildren();
  for (const step of loop.timeline) {
    const key = step.at + step.title;
    const details = evidence(step.evidence);
    details.dataset.key = key;
    if (open.has(key)) details.open = true;
    list.append(el("li", {}, el("span", { class: "kind " + step.kind }, step.kind),
      el("span", { class: "muted" }, step.at.replace("T", " ").slice(0, 19), " "), step.title,
      el("span", { class: "muted" }, " · " + step.source), details));
  }
  if (!loop.timeline.length) list.append(el("li", { class: "muted" }, "nothing happened yet"));
}

function render(board) {
  for (const chart of board.charts) renderChart(chart);
  renderModels(board.models);
  renderQuality(board.quality);
  renderDrift(board.drift);
  renderLoop(board.loop);
  lastBoard = board.generated_at;
  document.body.dataset.generatedAt = String(board.generated_at);
}

// ----------------------------------------------------------------------------- live feed

function connect() {
  const source = new EventSource("/api/v1/stream");
  source.addEventListener("board", (message) => {
    $("live").className = "badge on";
    render(JSON.parse(message.data));
  });
  source.addEventListener("error", () => { $("live").className = "badge off"; });
}

setInterval(() => {
  if (!lastBoard) return;
  const age = Math.max(0, Date.now() / 1000 - lastBoard);
  $("live-text").textContent = `updated ${age.toFixed(1)} s ago`;
}, 500);

// ----------------------------------------------------------------------------- actions

async function act(path, label) {
  const token = $("token").value.trim();
  const reason = $("reason").value.trim() || `${label} from the operator dashboard`;
  if (!token) { $("action-result").textContent = "the registry token is needed for actions"; return; }
  if (path.endsWith("rollback") && !window.confirm("Roll production back to the previous version?")) return;
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer " + token },
    body: JSON.stringify({ reason }),
  });
  const body = await response.json().catch(() => ({}));
  $("action-result").textContent = response.ok
    ? `${label}: done ${JSON.stringify(body.detail || {})}`
    : `${label}: ${response.status} ${body.message || ""}`;
}

// ----------------------------------------------------------------------------- trace

function renderTrace(trace) {
  const out = $("trace-result");
  out.replaceChildren();
  const answers = el("table", { id: "trace-answers" });
  fillTable(answers, trace.answers,
    ["route", "model_version", "fraud_probability", "decision", "degraded", "latency_ms", "predicted_at"]);
  out.append(el("h3", {}, "Answers"), answers);
  out.append(el("h3", {}, "Label"), el("p", {}, trace.label
    ? `${trace.label.is_fraud ? "fraud" : "legitimate"} (arrived ${trace.label.ingested_at}, ${trace.label.source})`
    : trace.label_status));
  out.append(el("h3", {}, "Lineage"), trace.lineage
    ? evidence(trace.lineage) : el("p", {}, trace.lineage_status));
  out.append(el("h3", {}, "Features: served vs recomputed offline (point in time)"),
    el("p", { id: "trace-skew" }, trace.recomputation_status));
  if (trace.recomputation) {
    const table = el("table", { id: "trace-features" });
    fillTable(table, trace.recomputation.inputs, ["name", "served", "offline", "difference", "skewed"],
      (row) => (row.skewed ? "skewed" : ""));
    out.append(table, evidence(trace.recomputation.streaming_features));
  }
}

async function traceOne(event) {
  event.preventDefault();
  const id = $("trace-id").value.trim();
  if (!id) return;
  $("trace-status").textContent = "tracing (reads predictions.log, recomputes features offline)…";
  const response = await fetch("/api/v1/trace/" + encodeURIComponent(id));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    $("trace-status").textContent = `${response.status}: ${body.message || JSON.stringify(body.detail || body)}`;
    $("trace-result").replaceChildren();
    return;
  }
  $("trace-status").textContent = "";
  renderTrace(body);
}

document.addEventListener("DOMContentLoaded", () => {
  $("pause").addEventListener("click", () => act("/api/v1/actions/loop/pause", "pause"));
  $("resume").addEventListener("click", () => act("/api/v1/actions/loop/resume", "resume"));
  $("rollback").addEventListener("click", () => act("/api/v1/actions/rollback", "rollback"));
  $("trace-form").addEventListener("submit", traceOne);
  connect();
});
