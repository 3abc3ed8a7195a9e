// The tickmesh console page: plain JavaScript, no build step, no external resources.
"use strict";

const REFRESH_MS = 2000;
const TERMINAL = new Set(["completed", "failed", "aborted"]);

const $ = (id) => document.getElementById(id);

const view = {
  selected: null, // lifetime id shown in the detail panel
  source: null, // EventSource of the selected lifetime
  lastSequence: 0,
  eventCount: 0,
  steps: new Map(), // execution id -> step record
  nodes: new Map(), // node id -> <ul> of its executions
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatTokens(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function formatCost(usage) {
  const cost = (usage.cost_micros || 0) / 1e6;
  return `${cost.toFixed(4)} ${usage.currency || "USD"}`;
}

function formatTime(iso) {
  if (!iso) return "";
  const at = new Date(iso);
  return at.toLocaleTimeString("en-GB", { hour12: false }) + "." +
    String(at.getMilliseconds()).padStart(3, "0");
}

function formatStarted(iso) {
  if (!iso) return "";
  const at = new Date(iso);
  return at.toLocaleDateString("en-CA") + " " + at.toLocaleTimeString("en-GB", { hour12: false });
}

function setStatus(text) {
  $("status").textContent = text;
}

function stateBadge(span, state) {
  span.textContent = state;
  span.className = `state state-${state}`;
  span.dataset.state = state;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  return body;
}

// --- the lifetimes list ----------------------------------------------------------

async function refreshList() {
  try {
    const body = await api("/api/lifetimes");
    $("tenant").textContent = `tenant ${body.tenant}`;
    renderList(body.lifetimes);
    setStatus(`updated ${formatTime(new Date().toISOString())}`);
  } catch (err) {
    setStatus(`cannot list lifetimes: ${err.message}`);
  }
}

function renderList(lifetimes) {
  const body = $("lifetimes-body");
  const rows = lifetimes.map((lt) => {
    const state = el("span");
    stateBadge(state, lt.state);
    state.setAttribute("data-testid", "lifetime-state");
    const row = el(
      "tr",
      { "data-testid": "lifetime-row", "data-lifetime-id": lt.id, "data-state": lt.state },
      el("td", { class: "mono", title: lt.id, text: lt.id.slice(-12) }),
      el("td", {}, state),
      el("td", { text: `${lt.graph.id} v${lt.graph.version}` }),
      el("td", { title: formatStarted(lt.created_at), text: formatTime(lt.created_at).slice(0, 8) }),
      el("td", { class: "num", "data-testid": "lifetime-tokens", text: formatTokens(lt.usage.tokens) }),
      el("td", { class: "num", "data-testid": "lifetime-cost", text: formatCost(lt.usage) }),
    );
    if (lt.id === view.selected) row.classList.add("selected");
    row.addEventListener("click", () => select(lt.id));
    return row;
  });
  body.replaceChildren(...rows);
  $("lifetimes-empty").hidden = lifetimes.length > 0;
}

// --- one lifetime ------------------------------------------------------------------

function select(id) {
  if (view.source) view.source.close();
  view.selected = id;
  view.lastSequence = 0;
  view.eventCount = 0;
  view.steps.clear();
  view.nodes.clear();
  $("events").replaceChildren();
  $("steps").replaceChildren();
  $("event-count").textContent = "0";
  $("action-result").textContent = "";
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  for (const row of document.querySelectorAll("#lifetimes-body tr")) {
    row.classList.toggle("selected", row.dataset.lifetimeId === id);
  }
  if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
  refreshDetail();
  openStream(id);
}

function openStream(id) {
  // EventSource reconnects by itself and sends Last-Event-ID, so the stream resumes
  // after the last event shown.
  const source = new EventSource(`/api/lifetimes/${encodeURIComponent(id)}/events`);
  view.source = source;
  source.addEventListener("lifetime", (message) => {
    if (view.selected !== id) return;
    const event = JSON.parse(message.data);
    if (event.sequence <= view.lastSequence) return;
    view.lastSequence = event.sequence;
    addEvent(event);
  });
  source.addEventListener("end", () => {
    source.close();
    if (view.selected === id) refreshDetail();
  });
  source.addEventListener("failure", (message) => {
    source.close();
    $("action-result").textContent = `event stream failed: ${JSON.parse(message.data).error}`;
  });
}

async function refreshDetail() {
  const id = view.selected;
  if (!id) return;
  try {
    renderDetail(await api(`/api/lifetimes/${encodeURIComponent(id)}`));
  } catch (err) {
    $("detail-error").hidden = false;
    $("detail-error").textContent = err.message;
  }
}

function renderDetail(lt) {
  if (lt.id !== view.selected) return;
  stateBadge($("detail-state"), lt.state);
  $("detail-graph").textContent = `${lt.graph.id} v${lt.graph.version}`;
  $("detail-executions").textContent = String(lt.execution_count);
  $("detail-tokens").textContent =
    `${formatTokens(lt.usage.tokens)} (${formatTokens(lt.usage.input_tokens)} in, ` +
    `${formatTokens(lt.usage.output_tokens)} out)`;
  $("detail-cost").textContent = formatCost(lt.usage);
  const error = lt.error ? `${lt.error_type || "error"}: ${lt.error}` : "";
  $("detail-error").hidden = !error;
  $("detail-error").textContent = error;
  updateButtons(lt.state);
}

function updateButtons(state) {
  const terminal = TERMINAL.has(state);
  $("btn-pause").disabled = terminal || state === "paused";
  $("btn-resume").disabled = state !== "paused";
  $("btn-abort").disabled = terminal;
  $("btn-signal").disabled = terminal;
}

function describe(event) {
  if (event.guardrail) {
    const g = event.guardrail;
    const action = (g.action || "").replace("GUARDRAIL_ACTION_", "").toLowerCase();
    const rules = (g.violations || []).map((v) => v.rule_id || v.message).join(", ");
    return `guardrail ${action}${g.policy_id ? ` (${g.policy_id})` : ""}` +
      `${rules ? `: ${rules}` : ""}${g.reason ? ` — ${g.reason}` : ""}`;
  }
  if (event.kind === "state_changed") {
    const extra = event.message && event.message !== event.state ? `: ${event.message}` : "";
    return `→ ${event.state}${extra}`;
  }
  if (event.signal) return `signal ${event.signal.name}${event.signal.approver ? ` from ${event.signal.approver}` : ""}`;
  if (event.error) return `${event.error.type}: ${event.error.message}`;
  return event.message || "";
}

function addEvent(event) {
  view.eventCount += 1;
  $("event-count").textContent = String(view.eventCount);
  const item = el(
    "li",
    {
      "data-testid": "event",
      "data-kind": event.kind,
      "data-sequence": String(event.sequence),
      class: `kind-${event.kind}`,
    },
    el("span", { class: "seq", text: `#${event.sequence}` }),
    el("span", { class: "at", text: formatTime(event.at) }),
    el("span", { class: "kind", text: event.kind + (event.node_id ? ` ${event.node_id}` : "") }),
    el("span", { class: "message", text: describe(event) }),
  );
  const list = $("events");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.append(item);
  if (atBottom) list.scrollTop = list.scrollHeight;
  updateStep(event);
  if (event.kind === "state_changed" || event.kind === "started") {
    stateBadge($("detail-state"), event.state);
    updateButtons(event.state);
    refreshDetail();
  } else if (event.kind === "step_finished") {
    refreshDetail();
  }
}

// The steps tree: node -> its executions, each with its status and duration.
function updateStep(event) {
  if (!event.execution_id || !event.node_id) return;
  let step = view.steps.get(event.execution_id);
  if (!step) {
    let executions = view.nodes.get(event.node_id);
    if (!executions) {
      executions = el("ul");
      view.nodes.set(event.node_id, executions);
      $("steps").append(
        el("li", { "data-testid": "step-node", "data-node-id": event.node_id },
          el("strong", { text: event.node_id }), executions),
      );
    }
    const item = el("li", { "data-testid": "step", "data-execution-id": event.execution_id });
    executions.append(item);
    step = { item, started: null, status: "running", duration: "", notes: [] };
    view.steps.set(event.execution_id, step);
  }
  if (event.kind === "step_dispatched") step.started = new Date(event.at);
  if (event.kind === "step_finished") {
    step.status = event.error ? "failed" : "ok";
    const ms = event.telemetry && event.telemetry.run_time_ms != null
      ? event.telemetry.run_time_ms
      : step.started ? new Date(event.at) - step.started : null;
    step.duration = ms == null ? "" : `${ms} ms`;
    if (event.telemetry && (event.telemetry.input_tokens || event.telemetry.output_tokens)) {
      step.notes.push(`${formatTokens(event.telemetry.input_tokens + event.telemetry.output_tokens)} tokens`);
    }
  }
  if (event.kind === "guardrail") step.notes.push(describe(event));
  step.item.dataset.status = step.status;
  step.item.replaceChildren(
    el("span", { class: "mono", title: event.execution_id, text: event.execution_id.slice(-8) }),
    " ",
    el("span", { class: `status-${step.status}`, text: step.status }),
    step.duration ? ` ${step.duration}` : "",
    step.notes.length ? ` · ${step.notes.join(" · ")}` : "",
  );
}

// --- actions -------------------------------------------------------------------------

async function act(action, body) {
  const id = view.selected;
  if (!id) return;
  $("action-result").textContent = `${action}…`;
  try {
    const lt = await api(`/api/lifetimes/${encodeURIComponent(id)}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    $("action-result").textContent = `${action}: now ${lt.state}`;
    renderDetail(lt);
    refreshList();
  } catch (err) {
    $("action-result").textContent = `${action} failed: ${err.message}`;
  }
}

function wire() {
  $("btn-pause").addEventListener("click", () => act("pause"));
  $("btn-resume").addEventListener("click", () => act("resume"));
  $("btn-abort").addEventListener("click", () => {
    if (confirm("Abort this lifetime? It cannot be resumed.")) act("abort");
  });
  $("btn-signal").addEventListener("click", () => {
    $("signal-form").hidden = false;
    $("signal-name").focus();
  });
  $("signal-cancel").addEventListener("click", () => { $("signal-form").hidden = true; });
  $("signal-form").addEventListener("submit", (submit) => {
    submit.preventDefault();
    let data;
    try {
      data = JSON.parse($("signal-data").value || "null");
    } catch (err) {
      $("action-result").textContent = `signal data is not JSON: ${err.message}`;
      return;
    }
    $("signal-form").hidden = true;
    act("signal", { name: $("signal-name").value, data });
  });
}

wire();
refreshList();
setInterval(() => {
  refreshList();
  if (view.selected) refreshDetail();
}, REFRESH_MS);
if (location.hash.length > 1) select(decodeURIComponent(location.hash.slice(1)));
