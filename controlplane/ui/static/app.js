// Model Pool operator page: polls the control API and drives the lifecycle of every model.
// Plain ES2017+; no framework, no build step. Every value from the server is written with
// textContent (never as HTML).
"use strict";

(() => {
  const KEY_STORAGE = "modelpool.apiKey";
  const POLL_MS = 1000;
  const SUCCESS_MS = 5000;
  const STATES = ["COLD", "WARMING", "HOT", "COOLING", "UNLOADING", "FAILED"];
  // Settings that take effect only after a restart (the server also reports them on save).
  const RESTART_KEYS = new Set([
    "control_port",
    "bind_host",
    "service_registry_url",
    "service_registry_paths",
    "service_registry_heartbeat_seconds",
  ]);
  const INTEGER_KEYS = new Set(["max_concurrent_models", "control_port"]);
  const LIST_KEYS = new Set(["warmup_models", "public_paths"]);

  // --- small helpers ------------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === "string" ? document.createTextNode(child) : child);
      }
    }
    return node;
  }

  const fmtInt = (n) => Math.round(n).toLocaleString("en-US");

  function fmtMB(mb) {
    if (mb === null || mb === undefined || Number.isNaN(mb)) return "–";
    return `${fmtInt(mb)} MB`;
  }

  function fmtDuration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    const h = Math.floor(s / 3600);
    return `${h}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  const fmtClock = (date) =>
    date.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" });

  function setBar(bar, used, limit) {
    const fill = $(".bar-fill", bar);
    const pct = limit > 0 ? Math.min(100, (100 * used) / limit) : 0;
    fill.style.width = `${pct.toFixed(1)}%`;
    bar.classList.toggle("warn", pct >= 70 && pct < 90);
    bar.classList.toggle("crit", pct >= 90);
    bar.classList.toggle("unlimited", !(limit > 0));
    bar.setAttribute("aria-valuenow", String(Math.round(used)));
    if (limit > 0) bar.setAttribute("aria-valuemax", String(Math.round(limit)));
    else bar.removeAttribute("aria-valuemax");
  }

  // --- messages -----------------------------------------------------------------------------

  const messageBox = $("#message");
  let messageTimer = null;

  function showMessage(text, kind = "info") {
    clearTimeout(messageTimer);
    $(".message-text", messageBox).textContent = text;
    messageBox.className = `message ${kind}`;
    messageBox.dataset.kind = kind;
    messageBox.hidden = false;
    if (kind === "success" || kind === "info") {
      messageTimer = setTimeout(() => {
        messageBox.hidden = true;
      }, SUCCESS_MS);
    }
  }

  const showError = (text) => showMessage(text, "error");

  $(".message-close", messageBox).addEventListener("click", () => {
    clearTimeout(messageTimer);
    messageBox.hidden = true;
  });

  // --- API ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, code, data) {
      super(message);
      this.status = status;
      this.code = code;
      this.data = data;
    }
  }

  const storedKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  // Calls the control API; answers {status, data, headers} or throws ApiError with the server's
  // message. `accept` lists non-2xx statuses whose body is still the answer (/health's 503).
  async function api(method, path, body, accept = []) {
    const headers = { Accept: "application/json" };
    const key = storedKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers, cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      setLive("down", "control plane unreachable, retrying");
      throw new ApiError(0, `control plane unreachable (${err.message})`, "network_error", null);
    }
    let data = null;
    const text = await resp.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_err) {
        data = null;
      }
    }
    if (resp.ok || accept.includes(resp.status)) {
      return { status: resp.status, data, headers: resp.headers };
    }
    const error = data && data.error ? data.error : {};
    const message = error.message || `HTTP ${resp.status} ${resp.statusText}`.trim();
    if (resp.status === 401) askForKey(Boolean(key));
    throw new ApiError(resp.status, message, error.code || "", data);
  }

  // --- API key prompt -------------------------------------------------------------------------

  const authForm = $("#auth-form");
  const authInput = $("#auth-key");

  function askForKey(rejected) {
    setLive("auth", "API key needed");
    $("#auth-hint").textContent = rejected
      ? "The control plane did not accept the API key. Enter the right one."
      : "The control plane asks for an API key. It is kept in this browser tab only and " +
        "sent as Authorization: Bearer <key>.";
    if (authForm.hidden) {
      authForm.hidden = false;
      authInput.focus();
    }
  }

  authForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = authInput.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    authInput.value = "";
    authForm.hidden = true;
    refreshNow();
    if (!configOriginal) loadConfig();
  });

  // --- live indicator -------------------------------------------------------------------------

  function setLive(kind, text) {
    $("#live-dot").className = `dot ${kind}`;
    $("#last-updated").textContent = text;
  }

  // --- pool summary (/health) -----------------------------------------------------------------

  let lastHealth = null;

  async function loadHealth() {
    const { data } = await api("GET", "/health", undefined, [503]);
    lastHealth = data || {};
    renderHealth(lastHealth);
  }

  function renderHealth(h) {
    const pill = $("#pool-status");
    pill.textContent = h.status || "unknown";
    pill.className = `status-pill ${h.status === "healthy" ? "ok" : "bad"}`;
    $("#pool-supervisord").textContent = h.supervisord ? `supervisord ${h.supervisord}` : "";
    $("#pool-active").textContent = h.active_models ?? "–";
    $("#pool-total").textContent = h.total_models ?? "–";
    const sub = [];
    if (h.loading_models) sub.push(`${h.loading_models} warming`);
    if (h.failed_models) sub.push(`${h.failed_models} failed`);
    if (h.max_concurrent_models) sub.push(`max ${h.max_concurrent_models}`);
    $("#pool-models-sub").textContent = sub.join(" · ") || "\u00a0";
    const used = Number(h.total_memory_mb) || 0;
    const limit = Number(h.memory_limit_mb) || 0;
    $("#pool-memory").textContent =
      limit > 0
        ? `${fmtInt(used)} / ${fmtInt(limit)} MB (${Math.round((100 * used) / limit)}%)`
        : `${fmtInt(used)} MB (no limit)`;
    setBar($("#pool-memory-bar"), used, limit);
    $("#pool-ports").textContent = h.available_ports ?? "–";
    const range = configOriginal && configOriginal.port_range;
    $("#pool-ports-sub").textContent = range
      ? `of ${range.end - range.start + 1} (${range.start}–${range.end})`
      : "\u00a0";
    // Per-model memory bars are drawn against the pool limit.
    for (const row of rows.values()) renderMemory(row);
  }

  // --- models table (/models) -----------------------------------------------------------------

  const tbody = $("#models-body");
  const rows = new Map(); // model_id -> row record
  let clockOffset = 0; // server clock minus client clock, seconds

  function estimateOffset(models, resp, receivedAt) {
    // Best: a model whose deadline and remaining TTL were computed at the same server instant.
    for (const m of models) {
      if (m.state === "HOT" && m.deadline && m.ttl_remaining_minutes > 0) {
        return m.deadline - m.ttl_remaining_minutes * 60 - receivedAt / 1000;
      }
    }
    const date = Date.parse(resp.headers.get("Date") || "");
    if (!Number.isNaN(date)) {
      const off = (date - receivedAt) / 1000;
      return Math.abs(off) > 2 ? off : 0;
    }
    return clockOffset;
  }

  const nodeHeads = new Map(); // node name -> its group's header row

  function nodeHead(name, node) {
    let tr = nodeHeads.get(name);
    if (!tr) {
      tr = el("tr", { class: "node-group", dataset: { node: name } }, el("th", { colspan: 9, scope: "colgroup" }));
      nodeHeads.set(name, tr);
    }
    const cell = tr.firstChild;
    if (!node) {
      cell.textContent = "Not loaded";
      return tr;
    }
    const limit = node.memory_limit_mb ? ` of ${fmtMB(node.memory_limit_mb)}` : "";
    const parts = [
      `Node ${name}`,
      node.state,
      node.address,
      `${node.models.length}/${node.max_concurrent_models} models`,
      `${fmtMB(node.memory_used_mb)}${limit}`,
    ];
    if (node.labels.length) parts.push(node.labels.join(", "));
    if (node.last_error) parts.push(node.last_error);
    cell.textContent = parts.join(" · ");
    tr.classList.toggle("down", node.state !== "UP");
    return tr;
  }

  async function loadModels() {
    const started = performance.now();
    const [resp, nodesResp] = await Promise.all([api("GET", "/models"), api("GET", "/nodes")]);
    const receivedAt = Date.now();
    const models = (resp.data && resp.data.models) || [];
    const nodes = (nodesResp.data && nodesResp.data.nodes) || [];
    clockOffset = estimateOffset(models, resp, receivedAt);
    const seen = new Set();
    const order = [];
    models.forEach((m) => {
      seen.add(m.model_id);
      let row = rows.get(m.model_id);
      if (!row) {
        row = createRow(m.model_id);
        rows.set(m.model_id, row);
      }
      // An action's answer that arrived after this poll started is newer: keep it.
      if (row.directAt <= started) updateRow(row, m, receivedAt);
    });
    // With more than one node, models are grouped under their node (unloaded ones last).
    const grouped = nodes.length > 1;
    const shown = new Set();
    if (grouped) {
      for (const node of nodes) {
        const here = models.filter((m) => m.node === node.name);
        if (!here.length && !node.placeable) continue;
        order.push(nodeHead(node.name, node));
        shown.add(node.name);
        here.forEach((m) => order.push(rows.get(m.model_id).tr));
      }
      const rest = models.filter((m) => !m.node || !shown.has(m.node));
      if (rest.length) {
        order.push(nodeHead("", null));
        shown.add("");
        rest.forEach((m) => order.push(rows.get(m.model_id).tr));
      }
    } else {
      models.forEach((m) => order.push(rows.get(m.model_id).tr));
    }
    for (const [name, tr] of nodeHeads) {
      if (!shown.has(name)) {
        tr.remove();
        nodeHeads.delete(name);
      }
    }
    order.forEach((tr, index) => {
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index]);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    $$(".placeholder", tbody).forEach((p) => p.remove());
    if (!models.length) {
      tbody.append(
        el("tr", { class: "placeholder" }, el("td", { colspan: 9, text: "No models registered." }))
      );
    }
    $("#models-count").textContent = `${models.length} registered`;
    setLive("ok", `updated ${fmtClock(new Date())}`);
  }

  function createRow(id) {
    const row = { id, data: null, busy: false, directAt: -Infinity, ttlEndsAt: null };
    const btn = (action, label, cls, title) =>
      el("button", {
        type: "button",
        class: `btn small ${cls}`,
        dataset: { action },
        title,
        text: label,
        onclick: () => act(row, action),
      });
    row.name = el("div", { class: "model-name" });
    row.meta = el("div", { class: "model-meta" });
    row.badge = el("span", { class: "badge" });
    // Replicas of a model with replicas.max > 1: "serving/max", each replica in the title.
    row.replicas = el("span", { class: "replicas mono", dataset: { field: "replicas" }, hidden: true });
    row.endpoint = el("td", { dataset: { field: "endpoint" } });
    row.ttl = el("td", { class: "ttl", dataset: { field: "ttl" } });
    row.inFlight = el("td", { class: "num", dataset: { field: "in_flight" } });
    row.requests = el("td", { class: "num", dataset: { field: "requests" } });
    row.memText = el("div", { class: "mem-text" });
    row.memBar = el("div", { class: "bar small" }, el("span", { class: "bar-fill" }));
    row.error = el("td", { class: "error-cell", dataset: { field: "last_error" } });
    row.buttons = {
      load: btn("load", "Load", "primary", "Load the model (returns at once)"),
      unload: btn("unload", "Unload", "", "Drain in-flight requests, then stop the worker"),
      "force-unload": btn("force-unload", "Force", "danger", "Stop the worker now, no drain"),
      extend: btn("extend", "Extend", "", "Move the TTL deadline by this many minutes"),
      cancel: btn("cancel", "Cancel", "danger", "Cancel this load: its worker is stopped"),
    };
    // The live load job: phase, a progress bar (indeterminate where the backend does not
    // say) and its cancel button.
    row.jobBar = el("progress", { class: "job-bar", max: "1" });
    row.jobText = el("span", { class: "job-text" });
    row.job = el("div", { class: "job", hidden: true }, row.jobBar, row.jobText, row.buttons.cancel);
    row.minutes = el("input", {
      type: "number",
      class: "minutes",
      name: "extend-minutes",
      min: "0",
      step: "any",
      value: "15",
      title: "minutes to add to the TTL",
      "aria-label": `minutes to extend the TTL of ${id} by`,
    });
    row.minutes.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        act(row, "extend");
      }
    });
    row.tr = el(
      "tr",
      { dataset: { model: id } },
      el("td", { class: "model-cell", dataset: { field: "model" } }, row.name, row.meta, row.job),
      el("td", { dataset: { field: "state" } }, row.badge, row.replicas),
      row.endpoint,
      row.ttl,
      row.inFlight,
      row.requests,
      el("td", { class: "mem-cell", dataset: { field: "memory" } }, row.memText, row.memBar),
      row.error,
      el(
        "td",
        { class: "actions" },
        el(
          "div",
          { class: "action-row" },
          row.buttons.load,
          row.buttons.unload,
          row.buttons["force-unload"]
        ),
        el(
          "div",
          { class: "action-row" },
          el("span", { class: "extend" }, row.minutes, el("span", { class: "unit", text: "min" })),
          row.buttons.extend
        )
      )
    );
    return row;
  }

  function renderReplicas(row, m) {
    const counts = m.replica_counts || {};
    const many = (counts.max || 1) > 1;
    row.replicas.hidden = !many;
    if (!many) return;
    const pinned = counts.pinned === null || counts.pinned === undefined ? "" : ` · pinned ${counts.pinned}`;
    row.replicas.textContent = `${counts.serving || 0}/${counts.max}${pinned}`;
    const lines = (m.replicas || []).map(
      (r) => `#${r.replica} ${r.state}${r.node ? " on " + r.node : ""}${r.port ? ":" + r.port : ""} · ${r.in_flight} in flight`
    );
    if (counts.blocked) lines.push(`scale-up waits: ${counts.blocked}`);
    row.replicas.title = `replicas serving/max (min ${counts.min})\n` + lines.join("\n");
  }

  function updateRow(row, m, receivedAt) {
    row.data = m;
    const state = STATES.includes(m.state) ? m.state : "COLD";
    // Local deadlines, so the TTL counts down every second between polls.
    row.ttlEndsAt =
      m.state === "HOT" && m.expires && m.ttl_remaining_minutes !== null
        ? receivedAt + m.ttl_remaining_minutes * 60000
        : null;
    row.graceEndsAt =
      m.state === "COOLING" && m.grace_until
        ? receivedAt + (m.grace_until - (receivedAt / 1000 + clockOffset)) * 1000
        : null;

    row.tr.className = `state-row-${state.toLowerCase()}`;
    row.name.textContent = m.display_name || m.model_id;
    const meta = [el("span", { class: "mono", text: m.model_id })];
    if (m.backend) meta.push(el("span", { class: "chip", text: m.backend }));
    if (m.warmup) meta.push(el("span", { class: "chip chip-warm", text: "warmup" }));
    for (const span of m.schedule || []) {
      // Warmup schedule windows: highlighted while one is open.
      const open = m.scheduled_now ? " chip-warm" : "";
      meta.push(el("span", { class: "chip" + open, text: "warm " + span, title: "schedule window" }));
    }
    for (const tag of (m.tags || []).slice(0, 3)) meta.push(el("span", { class: "chip", text: tag }));
    row.meta.replaceChildren(...meta);

    row.badge.textContent = m.state;
    row.badge.className = `badge state-${state}`;
    const since = m.state_since ? new Date((m.state_since - clockOffset) * 1000) : null;
    let title = since ? `${m.state} since ${fmtClock(since)}` : m.state;
    if (m.state === "FAILED" && m.retry_after_seconds) {
      title += ` · automatic retry in ${Math.ceil(m.retry_after_seconds)}s`;
    }
    row.badge.title = title;
    renderReplicas(row, m);

    if (m.endpoint && /^https?:\/\//.test(m.endpoint)) {
      row.endpoint.replaceChildren(
        el("a", {
          href: `${m.endpoint}/health`,
          target: "_blank",
          rel: "noopener noreferrer",
          class: "mono",
          title: `${m.endpoint} — open the worker's /health`,
          text: m.endpoint.replace(/^https?:\/\//, ""),
        })
      );
    } else if (m.port) {
      row.endpoint.replaceChildren(el("span", { class: "mono muted", text: `:${m.port}` }));
    } else {
      row.endpoint.textContent = "-";
    }

    const leases = (m.leases || []).length;
    row.inFlight.textContent = String(m.in_flight ?? 0) + (leases ? ` · ${leases} leased` : "");
    row.inFlight.title = (m.leases || [])
      .map((l) => `${l.holder || "lease"} until ${new Date(l.expires_at * 1000).toLocaleTimeString()}`)
      .join("\n");
    row.inFlight.classList.toggle("active", (m.in_flight || 0) > 0);
    row.requests.textContent = fmtInt(m.requests || 0);
    renderMemory(row);
    renderError(row, m.last_error);
    renderTtl(row, Date.now());
    renderJob(row);
    renderButtons(row);
  }

  const LIVE_PHASES = ["queued", "spawning", "loading_weights"];

  function liveJob(m) {
    return m && m.job && LIVE_PHASES.includes(m.job.phase) ? m.job : null;
  }

  function renderJob(row) {
    const job = liveJob(row.data);
    row.job.hidden = !job;
    if (!job) return;
    row.job.dataset.job = job.job_id;
    row.job.dataset.phase = job.phase;
    const known = job.progress !== null && job.progress !== undefined;
    if (known) row.jobBar.value = job.progress;
    else row.jobBar.removeAttribute("value"); // indeterminate
    const phase = job.phase.replace("_", " ");
    row.jobText.textContent = known ? `${phase} ${Math.round(job.progress * 100)}%` : phase;
    row.job.title = `load job ${job.job_id}`;
  }

  function renderMemory(row) {
    const m = row.data;
    if (!m) return;
    const limit = lastHealth ? Number(lastHealth.memory_limit_mb) || 0 : 0;
    const mb = Number(m.memory_mb) || 0;
    const occupying = ["WARMING", "HOT", "COOLING", "UNLOADING"].includes(m.state);
    row.memText.textContent = occupying || mb > 0 ? fmtMB(mb) : "-";
    row.memText.title =
      (m.memory_source === "measured" ? "measured" : "estimate") +
      (limit > 0 ? ` · ${((100 * mb) / limit).toFixed(1)}% of the ${fmtInt(limit)} MB limit` : "");
    setBar(row.memBar, mb, limit);
    row.memBar.hidden = !(occupying || mb > 0);
  }

  function renderError(row, text) {
    if (!text) {
      row.error.replaceChildren(el("span", { class: "muted", text: "-" }));
      return;
    }
    let span = $(".err", row.error);
    if (!span) {
      span = el("span", {
        class: "err",
        tabindex: "0",
        role: "button",
        "aria-expanded": "false",
      });
      const toggle = () => {
        const open = span.classList.toggle("expanded");
        span.setAttribute("aria-expanded", String(open));
      };
      span.addEventListener("click", toggle);
      span.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" || ev.key === " ") {
          ev.preventDefault();
          toggle();
        }
      });
      row.error.replaceChildren(span);
    }
    if (span.textContent !== text) span.textContent = text;
    span.title = `${text}\n(click to expand)`;
  }

  function renderTtl(row, now) {
    const m = row.data;
    if (!m) return;
    let text;
    let cls = "ttl";
    const loaded = m.state === "HOT" || m.state === "COOLING";
    if (!loaded || m.ttl_remaining_minutes === null || m.ttl_remaining_minutes === undefined) {
      text = "-";
      cls += " muted";
    } else if (m.state === "COOLING") {
      text = row.graceEndsAt !== null ? `grace ${fmtDuration((row.graceEndsAt - now) / 1000)}` : "grace";
      cls += " cooling";
    } else if (!m.expires) {
      text = "forever";
      cls += " forever";
    } else {
      const left = row.ttlEndsAt !== null ? (row.ttlEndsAt - now) / 1000 : 0;
      text = fmtDuration(left);
      if (left < 60) cls += " soon";
    }
    if (row.ttl.textContent !== text) row.ttl.textContent = text;
    row.ttl.className = cls;
    if (m.ttl_minutes !== undefined && m.ttl_minutes !== null) {
      row.ttl.title = m.expires ? `TTL ${m.ttl_minutes} min` : "never expires";
    }
  }

  function renderButtons(row) {
    const state = row.data ? row.data.state : "COLD";
    const enabled = {
      load: state === "COLD" || state === "FAILED",
      unload: state === "HOT" || state === "COOLING",
      "force-unload": state === "HOT" || state === "COOLING" || state === "UNLOADING",
      extend: state === "HOT" || state === "COOLING",
      cancel: liveJob(row.data) !== null,
    };
    for (const [action, button] of Object.entries(row.buttons)) {
      button.disabled = row.busy || !enabled[action];
    }
    row.minutes.disabled = !enabled.extend;
  }

  setInterval(() => {
    const now = Date.now();
    for (const row of rows.values()) renderTtl(row, now);
  }, 1000);

  // --- actions --------------------------------------------------------------------------------

  async function act(row, action) {
    const id = row.id;
    const path = `/models/${encodeURIComponent(id)}`;
    let request;
    if (action === "cancel") return cancelJob(row);
    if (action === "load") request = ["load", { wait: false }, "Load"];
    else if (action === "unload") request = ["unload", {}, "Unload"];
    else if (action === "force-unload") request = ["unload", { force: true }, "Force unload"];
    else {
      const minutes = row.minutes.valueAsNumber;
      if (!(minutes > 0)) {
        row.minutes.setAttribute("aria-invalid", "true");
        showError(`Extend TTL of ${id}: enter a number of minutes greater than 0`);
        return;
      }
      row.minutes.removeAttribute("aria-invalid");
      request = ["extend-ttl", { minutes }, "Extend TTL"];
    }
    const [verb, body, label] = request;
    row.busy = true;
    renderButtons(row);
    try {
      const { data } = await api("POST", `${path}/${verb}`, body);
      if (data && data.model_id === id) {
        row.directAt = performance.now();
        updateRow(row, data, Date.now());
      }
      if (action === "load") {
        showMessage(
          data && data.state === "HOT" ? `${id} is HOT` : `Loading ${id}…`,
          "success"
        );
      } else if (action === "extend") {
        const capped = data && data.clamped ? ` (capped at ${data.max_ttl_minutes} min)` : "";
        showMessage(`TTL of ${id} extended by ${body.minutes} min${capped}`, "success");
      } else {
        showMessage(`${label}: ${id} is ${data ? data.state : "unloading"}`, "success");
      }
    } catch (err) {
      if (err.status !== 401) showError(`${label} ${id}: ${err.message}`);
    } finally {
      row.busy = false;
      renderButtons(row);
      refreshNow();
    }
  }

  async function cancelJob(row) {
    const job = liveJob(row.data);
    if (!job) return;
    row.busy = true;
    renderButtons(row);
    try {
      const { data } = await api("DELETE", `/jobs/${encodeURIComponent(job.job_id)}`);
      showMessage(`Load of ${row.id} ${data ? data.phase : "cancelled"}`, "success");
    } catch (err) {
      if (err.status !== 401) showError(`Cancel the load of ${row.id}: ${err.message}`);
    } finally {
      row.busy = false;
      renderButtons(row);
      refreshNow();
    }
  }

  // --- polling --------------------------------------------------------------------------------

  let pending = false;
  let again = false;

  async function refresh() {
    if (pending) {
      again = true; // one more pass as soon as this one is done
      return;
    }
    pending = true;
    try {
      const results = await Promise.allSettled([loadModels(), loadHealth()]);
      const failed = results.find((r) => r.status === "rejected");
      if (failed && failed.reason && failed.reason.status && failed.reason.status !== 401) {
        setLive("down", `error: ${failed.reason.message}`);
      }
    } finally {
      pending = false;
    }
    if (again) {
      again = false;
      refresh();
    }
  }

  function refreshNow() {
    refresh();
  }

  function poll() {
    // setTimeout chaining: a tick whose previous request is still pending is skipped.
    const tick = document.hidden || pending ? Promise.resolve() : refresh();
    tick.finally(() => setTimeout(poll, POLL_MS));
  }

  // --- register form --------------------------------------------------------------------------

  const registerForm = $("#register-form");
  const registerError = $("#register-error");
  const backendSelect = $("#reg-backend");

  function syncBackendFields() {
    const backend = backendSelect.value;
    for (const field of $$("[data-backend]", registerForm)) {
      field.hidden = !field.dataset.backend.split(" ").includes(backend);
    }
  }
  backendSelect.addEventListener("change", syncBackendFields);
  syncBackendFields();

  function clearFieldErrors(form) {
    for (const node of $$("[aria-invalid]", form)) node.removeAttribute("aria-invalid");
    for (const node of $$(".field-error", form)) node.classList.remove("field-error");
    for (const node of $$(".has-error", form)) node.classList.remove("has-error");
    for (const node of $$(".error-text.field-msg", form)) node.remove();
    for (const node of $$("[aria-describedby]", form)) node.removeAttribute("aria-describedby");
  }

  // The inputs a server message is about: it names the key first ("port_range.end: ...",
  // "max_concurrent_models: ...", "model.upstream_url: ..."), before the first ':'.
  function fieldsNamed(form, message, prefix = "") {
    let head = String(message).split(":")[0].trim();
    if (prefix && head.startsWith(prefix)) head = head.slice(prefix.length);
    const candidates = [head, head.split(/[.[]/)[0]];
    for (const name of candidates) {
      if (!name) continue;
      const exact = $$(`[name="${CSS.escape(name)}"]`, form);
      if (exact.length) return exact;
      const nested = $$("[name]", form).filter((n) => n.name.startsWith(`${name}.`));
      if (nested.length) return nested;
    }
    return [];
  }

  // Marks the fields a server message names; answers whether any was found.
  function markFieldError(form, message, prefix = "") {
    const inputs = fieldsNamed(form, message, prefix).filter((n) => !n.closest("[hidden]"));
    if (!inputs.length) return false;
    const wrapper = inputs[0].closest(".field") || inputs[0].parentElement;
    const msgId = `err-${Math.random().toString(36).slice(2, 9)}`;
    for (const input of inputs) {
      input.setAttribute("aria-invalid", "true");
      input.classList.add("field-error");
      input.setAttribute("aria-describedby", msgId);
    }
    wrapper.classList.add("has-error");
    wrapper.append(el("p", { class: "error-text field-msg", id: msgId, role: "alert", text: message }));
    inputs[0].focus();
    return true;
  }

  function numberOrText(input) {
    const raw = input.value.trim();
    if (raw === "") return null;
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw;
  }

  registerForm.addEventListener("input", (ev) => {
    const field = ev.target.closest(".field");
    if (field && field.classList.contains("has-error")) {
      field.classList.remove("has-error");
      for (const n of $$(".field-error", field)) {
        n.classList.remove("field-error");
        n.removeAttribute("aria-invalid");
      }
      for (const n of $$(".field-msg", field)) n.remove();
    }
  });

  registerForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearFieldErrors(registerForm);
    registerError.hidden = true;
    const f = registerForm.elements;
    const body = { model_id: f.model_id.value.trim(), backend: f.backend.value };
    for (const name of ["display_name", "model_path", "upstream_url", "upstream_model"]) {
      const input = f[name];
      const value = input.value.trim();
      if (value && !input.closest("[hidden]")) body[name] = value;
    }
    for (const name of ["ttl_minutes", "memory_mb"]) {
      const value = numberOrText(f[name]);
      if (value !== null) body[name] = value;
    }
    if (f.warmup.checked) body.warmup = true;
    const tags = f.tags.value
      .split(",")
      .map((t) => t.trim())
      .filter(Boolean);
    if (tags.length) body.tags = tags;
    const submit = $("#register-submit");
    submit.disabled = true;
    try {
      await api("POST", "/models/register", body);
      showMessage(`Registered ${body.model_id}`, "success");
      registerForm.reset();
      syncBackendFields();
      refreshNow();
    } catch (err) {
      if (err.status === 401) return;
      registerError.textContent = err.message;
      registerError.hidden = false;
      markFieldError(registerForm, err.message, "model.");
      showError(`Register ${body.model_id || "model"}: ${err.message}`);
    } finally {
      submit.disabled = false;
    }
  });

  // --- settings editor (/config) --------------------------------------------------------------

  const configForm = $("#config-form");
  const configFields = $("#config-fields");
  const configError = $("#config-error");
  const saveButton = $("#save-config");
  let configOriginal = null;

  function kindOf(key, value) {
    if (key === "api_key") return "secret";
    if (key === "port_range") return "range";
    if (LIST_KEYS.has(key) || Array.isArray(value)) return "list";
    if (typeof value === "boolean") return "bool";
    if (typeof value === "number") return "number";
    if (value && typeof value === "object") return "map";
    return "text";
  }

  function buildConfigForm(cfg) {
    const nodes = [];
    for (const [key, value] of Object.entries(cfg)) {
      const kind = kindOf(key, value);
      const id = `cfg-${key}`;
      const label = el(
        "label",
        { for: kind === "range" || kind === "map" ? undefined : id },
        el("span", { class: "mono", text: key }),
        RESTART_KEYS.has(key) ? el("span", { class: "chip chip-restart", text: "restart" }) : null
      );
      const field = el("div", { class: `field cfg-${kind}`, dataset: { key } });
      if (kind === "bool") {
        field.classList.add("field-check");
        field.append(el("input", { id, name: key, type: "checkbox", checked: value }), label);
      } else if (kind === "number") {
        field.append(
          label,
          el("input", {
            id,
            name: key,
            type: "number",
            step: INTEGER_KEYS.has(key) ? "1" : "any",
            value: String(value),
          })
        );
      } else if (kind === "range") {
        field.append(
          label,
          el(
            "div",
            { class: "pair" },
            el("input", {
              name: `${key}.start`,
              type: "number",
              step: "1",
              value: String(value.start),
              "aria-label": `${key} start`,
            }),
            el("span", { class: "muted", text: "-" }),
            el("input", {
              name: `${key}.end`,
              type: "number",
              step: "1",
              value: String(value.end),
              "aria-label": `${key} end`,
            })
          )
        );
      } else if (kind === "map") {
        const group = el("div", { class: "triple" });
        for (const [sub, subValue] of Object.entries(value)) {
          group.append(
            el(
              "label",
              { class: "sub" },
              el("span", { class: "muted", text: sub }),
              el("input", {
                name: `${key}.${sub}`,
                type: "text",
                value: String(subValue),
                spellcheck: "false",
              })
            )
          );
        }
        field.append(label, group);
      } else if (kind === "list") {
        field.classList.add("field-span");
        field.append(
          label,
          el("input", {
            id,
            name: key,
            type: "text",
            value: (value || []).join(", "),
            placeholder: "comma-separated",
            spellcheck: "false",
          })
        );
      } else {
        field.append(
          label,
          el("input", {
            id,
            name: key,
            type: "text",
            value: String(value ?? ""),
            spellcheck: "false",
            autocomplete: "off",
            placeholder: kind === "secret" ? "empty: no auth" : undefined,
          })
        );
      }
      nodes.push(field);
    }
    configFields.replaceChildren(...nodes);
    updateChangeCount();
  }

  const input = (name) => configForm.querySelector(`[name="${CSS.escape(name)}"]`);

  function readConfigChanges() {
    const changes = {};
    for (const [key, original] of Object.entries(configOriginal || {})) {
      const kind = kindOf(key, original);
      let value;
      if (kind === "bool") value = input(key).checked;
      else if (kind === "number") value = numberOrText(input(key));
      else if (kind === "range") {
        value = {
          start: numberOrText(input(`${key}.start`)),
          end: numberOrText(input(`${key}.end`)),
        };
      } else if (kind === "map") {
        value = {};
        for (const sub of Object.keys(original)) value[sub] = input(`${key}.${sub}`).value.trim();
      } else if (kind === "list") {
        value = input(key)
          .value.split(",")
          .map((s) => s.trim())
          .filter(Boolean);
      } else if (kind === "secret") {
        value = input(key).value;
        if (value === original) continue; // "***" (or empty) as shown: not changed
      } else value = input(key).value.trim();
      if (JSON.stringify(value) !== JSON.stringify(original)) changes[key] = value;
    }
    return changes;
  }

  function updateChangeCount() {
    const n = Object.keys(readConfigChanges()).length;
    $("#config-changes").textContent = n ? `${n} unsaved change${n > 1 ? "s" : ""}` : "";
    saveButton.disabled = n === 0;
  }

  configForm.addEventListener("input", (ev) => {
    const field = ev.target.closest(".field");
    if (field && field.classList.contains("has-error")) {
      field.classList.remove("has-error");
      for (const n of $$(".field-error", field)) {
        n.classList.remove("field-error");
        n.removeAttribute("aria-invalid");
        n.removeAttribute("aria-describedby");
      }
      for (const n of $$(".field-msg", field)) n.remove();
    }
    updateChangeCount();
  });

  async function loadConfig() {
    try {
      const { data } = await api("GET", "/config");
      configOriginal = data;
      configError.hidden = true;
      buildConfigForm(data);
      if (lastHealth) renderHealth(lastHealth);
    } catch (err) {
      if (err.status !== 401) {
        configFields.replaceChildren(
          el("p", { class: "error-text", text: `Could not read settings: ${err.message}` })
        );
      }
    }
  }

  $("#reload-config").addEventListener("click", () => {
    clearFieldErrors(configForm);
    loadConfig();
  });

  configForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearFieldErrors(configForm);
    configError.hidden = true;
    const changes = readConfigChanges();
    if (!Object.keys(changes).length) return;
    saveButton.disabled = true;
    try {
      const { data } = await api("PATCH", "/config", changes);
      if (typeof changes.api_key === "string") {
        // The next calls need the new key (an empty key turns authentication off).
        if (changes.api_key) sessionStorage.setItem(KEY_STORAGE, changes.api_key);
        else sessionStorage.removeItem(KEY_STORAGE);
      }
      configOriginal = data.config;
      buildConfigForm(data.config);
      const restart = data.restart_required || [];
      showMessage(
        `Settings saved: ${Object.keys(changes).join(", ")}` +
          (restart.length ? ` (restart the stack to apply ${restart.join(", ")})` : ""),
        "success"
      );
      refreshNow();
    } catch (err) {
      if (err.status === 401) return;
      if (!markFieldError(configForm, err.message)) {
        configError.textContent = err.message;
        configError.hidden = false;
      }
      showError(`Settings not saved: ${err.message}`);
    } finally {
      updateChangeCount();
    }
  });

  // --- start ----------------------------------------------------------------------------------

  $("#origin").textContent = `control plane · ${location.host}`;
  loadConfig();
  poll();
})();
