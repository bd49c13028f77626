// Live job page: redraws progress, the round's sites and the charts from the job's websocket.
// The server sends {"type": "state", "entries": [...], "state": {...}} after every committed
// change (see training/live.py for the state's shape); this file only draws it.
(function () {
  "use strict";
  const root = document.getElementById("live");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const statusEl = $("live-status");
  let retry = 500;

  function text(el, value) { if (el) el.textContent = value; }

  function cell(row, value) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined || value === "" ? "—" : value;
    row.appendChild(td);
  }

  function renderSites(round) {
    const body = $("round-sites").tBodies[0];
    body.replaceChildren();
    if (!round || !round.sites.length) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = 4; td.className = "muted"; td.textContent = "No round has been sent yet.";
      return;
    }
    for (const s of round.sites) {
      const tr = document.createElement("tr");
      tr.dataset.status = s.status;
      cell(tr, s.institution); cell(tr, s.status_label); cell(tr, s.samples); cell(tr, s.reason);
      body.appendChild(tr);
    }
  }

  function chart(id, traces, layout) {
    const el = $(id);
    if (!el || !window.Plotly) return;
    window.Plotly.react(el, traces, Object.assign({
      margin: { t: 30, r: 10, b: 70, l: 50 }, height: 280, showlegend: traces.length > 1,
      legend: { orientation: "h", x: 0, y: 1.2 },
    }, layout), { displayModeBar: false, responsive: true });
  }

  function renderCharts(series) {
    chart("chart-validation", [{
      x: series.rounds, y: series.validation, mode: "lines+markers",
      name: series.metric || "validation",
    }], { xaxis: { title: { text: "round" }, dtick: 1 },
          yaxis: { title: { text: (series.metric || "metric").replace("validation_", "") } } });
    chart("chart-loss", series.site_loss.map((s) => ({
      x: s.rounds, y: s.values, mode: "lines+markers", name: s.institution,
    })), { xaxis: { title: { text: "round" }, dtick: 1 }, yaxis: { title: { text: "loss" } } });
    const names = series.privacy.map((p) => p.institution);
    const caps = series.privacy.map((p) => p.cap);
    chart("chart-privacy", [
      { type: "bar", x: names, y: series.privacy.map((p) => p.spent), name: "ε spent (all jobs)" },
      { type: "bar", x: names, y: series.privacy.map((p) => p.job), name: "ε spent (this job)" },
      { type: "scatter", mode: "markers", x: names, y: caps, name: "cap",
        marker: { symbol: "line-ew-open", size: 30 } },
    ], { yaxis: { title: { text: "ε" } }, barmode: "group" });
    chart("chart-contribution", [{
      type: "bar", x: series.contribution.map((c) => c.institution),
      y: series.contribution.map((c) => c.score), name: "score",
    }], { yaxis: { title: { text: "score" } } });
  }

  // What the job waits on, in words (training/rounds/waiting.py): the coordinator when it is
  // not heard from, the stage, each site still expected with its worker's state, absent sites.
  function renderWaiting(w) {
    const box = $("waiting");
    if (!box || !w) return;
    const signature = JSON.stringify(w);
    if (box.dataset.signature === signature) return; // unchanged: nothing to announce again
    box.dataset.signature = signature;
    const parts = [];
    if (w.coordinator) {
      const p = document.createElement("p");
      p.className = "notice bad"; p.id = "waiting-coordinator"; p.setAttribute("role", "alert");
      p.textContent = w.coordinator.text; parts.push(p);
    }
    if (w.summary) {
      const p = document.createElement("p"); p.id = "waiting-summary"; p.textContent = w.summary;
      parts.push(p);
    }
    const list = document.createElement("ul");
    list.id = "waiting-sites"; list.className = "reasons";
    for (const s of w.sites) {
      const li = document.createElement("li");
      li.dataset.workerState = s.state;
      const badge = document.createElement("span");
      badge.className = `badge ${s.tone}`; badge.textContent = s.label;
      li.append(badge, ` ${s.text}`);
      list.appendChild(li);
    }
    parts.push(list);
    const absent = document.createElement("div");
    absent.id = "absent-sites";
    for (const a of w.absent) {
      const p = document.createElement("p");
      p.className = "notice warn"; p.dataset.missed = a.missed; p.textContent = `${a.text}.`;
      absent.appendChild(p);
    }
    parts.push(absent);
    box.dataset.waitingOn = w.sites.length;
    box.replaceChildren(...parts);
  }

  function render(state) {
    const job = state.job;
    root.dataset.jobState = job.state;
    root.dataset.roundsClosed = job.rounds_closed;
    text($("live-job-state"), job.state_label);
    const jp = $("job-progress");
    jp.max = job.rounds_total || 1; jp.value = job.rounds_closed;
    text($("job-progress-text"), `${job.rounds_closed} of ${job.rounds_total}`);
    const rp = $("round-progress");
    const round = state.round;
    rp.max = round ? Math.max(round.expected, 1) : 1;
    rp.value = round ? round.reported : 0;
    text($("round-progress-text"), round
      ? `round ${round.index} (${round.state_label.toLowerCase()}): ${round.reported} of ${round.expected}`
      : "no round yet");
    renderSites(round);
    const warnings = $("budget-warnings");
    warnings.replaceChildren(...state.budget_warnings.map((w) => {
      const p = document.createElement("p"); p.className = "notice warn"; p.textContent = w; return p;
    }));
    renderWaiting(state.waiting);
    renderCharts(state.series);
  }

  function addEntries(entries) {
    const list = $("live-activity");
    for (const e of entries) {
      const li = document.createElement("li");
      const time = new Date(e.time).toLocaleTimeString();
      li.textContent = `${time} · #${e.seq} ${e.event}` + (e.institution ? ` · ${e.institution}` : "");
      list.prepend(li);
    }
    while (list.children.length > 20) list.lastElementChild.remove();
  }

  // Sections rendered by the server (the heading's state, the decisions, contributions, history)
  // are swapped in place by htmx after a change: the hidden #live-refresher asks for this page
  // once (hx-select + hx-select-oob pick the sections out of it), so the whole page stays current
  // without a reload. Debounced: a round closing writes several entries at once.
  let refreshTimer = null;
  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => {
      if (window.htmx) window.htmx.trigger("#live-refresher", "live-refresh");
    }, 400);
  }
  document.body.addEventListener("htmx:afterSettle", () => {
    root.dataset.refreshed = String(Number(root.dataset.refreshed || 0) + 1);
  });

  // Heartbeats write no ledger entry, so nothing wakes the socket when a worker goes quiet:
  // while the job may be waiting, ask for a fresh state every half-minute ("offline for 4 min"
  // keeps counting, a worker that stopped shows as offline).
  const WAITING_REFRESH_MS = 30000;
  let socket = null;
  setInterval(() => {
    const waiting = ["approved", "running"].includes(root.dataset.jobState);
    if (waiting && socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "refresh" }));
    }
  }, WAITING_REFRESH_MS);

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}${root.dataset.liveUrl}`);
    socket.onopen = () => { retry = 500; text(statusEl, "updates live"); root.dataset.live = "open"; };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "state") return;
      render(message.state);
      addEntries(message.entries);
      if (message.entries.length) scheduleRefresh();
    };
    socket.onclose = (event) => {
      root.dataset.live = "closed";
      if (event.code === 4403) { text(statusEl, "live updates stopped: access refused"); return; }
      text(statusEl, "reconnecting…");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 15000);
    };
  }

  render(JSON.parse($("live-state").textContent));
  connect();
})();
