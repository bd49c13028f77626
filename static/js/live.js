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

  // Colours come from the server (consortium/core/palette.py, the same on every page and in the
  // PDFs): an institution keeps its colour everywhere.
  const paletteEl = $("chart-palette");
  const palette = paletteEl ? JSON.parse(paletteEl.textContent) : { series: [], institutions: {} };
  function colourOf(name, i) {
    return palette.institutions[name] || palette.series[i % palette.series.length] || undefined;
  }
  // Metrics that are shares: their axis is [0, 1] whatever the values, so a rise reads true.
  const SHARE_METRIC = /accuracy|dice|auc|f1|precision|recall/i;

  function axis(title, extra) {
    return Object.assign({
      title: { text: title }, color: palette.axis, gridcolor: palette.grid, zeroline: false,
      automargin: true,
    }, extra || {});
  }

  function chart(id, traces, layout) {
    const el = $(id);
    if (!el || !window.Plotly) return;
    // Legends sit under the plot, never over the data.
    window.Plotly.react(el, traces, Object.assign({
      margin: { t: 12, r: 16, b: 36, l: 56 }, height: 230,
      showlegend: traces.filter((t) => t.showlegend !== false).length > 1,
      // Below the axis title, in the figure's own margin (grown to fit it).
      legend: { orientation: "h", x: 0, xref: "container", y: 0, yref: "container", yanchor: "bottom" },
      font: { size: 12 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    }, layout), { displayModeBar: false, responsive: true });
  }

  function note(text) {
    return [{ text, xref: "paper", yref: "paper", x: 0.5, y: 0.5, showarrow: false,
      font: { color: palette.axis } }];
  }

  function roundAxis(rounds) {
    const last = Math.max(1, ...rounds);
    return axis("round", { dtick: 1, range: [-0.3, last + 0.3] });
  }

  // Nothing is drawn before the first round has closed: empty axes (−1 to 6) say nothing.
  function renderCharts(series, roundsClosed) {
    const box = $("charts");
    const empty = $("charts-empty");
    if (!box) return;
    const drawn = roundsClosed > 0;
    box.hidden = !drawn;
    if (empty) empty.hidden = drawn;
    if (!drawn) {
      for (const el of box.querySelectorAll(".chart")) if (window.Plotly) window.Plotly.purge(el);
      return;
    }
    const metric = series.metric || "";
    const metricName = metric.replace("validation_", "").replace(/_/g, " ") || "metric";
    const share = SHARE_METRIC.test(metric);
    chart("chart-validation", [{
      x: series.rounds, y: series.validation, mode: "lines+markers", name: metricName,
      line: { color: palette.global_model }, marker: { color: palette.global_model },
    }], {
      xaxis: roundAxis(series.rounds),
      yaxis: axis(share ? `${metricName} (0 to 1)` : metricName, share ? { range: [0, 1] } : {}),
      annotations: series.validation.some((v) => v !== null) ? [] : note("not evaluated yet"),
    });
    const lossRounds = series.site_loss.flatMap((s) => s.rounds);
    chart("chart-loss", series.site_loss.map((s, i) => ({
      x: s.rounds, y: s.values, mode: "lines+markers", name: s.institution,
      line: { color: colourOf(s.institution, i) }, marker: { color: colourOf(s.institution, i) },
    })), {
      xaxis: roundAxis(lossRounds.length ? lossRounds : series.rounds),
      yaxis: axis("training loss", { rangemode: "tozero" }),
      annotations: series.site_loss.length ? [] : note("no site has reported a loss yet"),
    });
    // One bar group per institution, drawn sideways: hospitals' names are long, and as labels
    // under vertical bars they took the whole chart (its bars were squeezed to a few pixels).
    const names = series.privacy.map((p) => p.institution);
    const labels = shortLabels(names);
    const caps = series.privacy.map((p) => p.cap).filter((c) => c !== null && c !== undefined);
    const cap = caps.length ? Math.max(...caps) : null;
    const top = Math.max(cap || 0, ...series.privacy.map((p) => p.spent || 0), 0.1) * 1.15;
    chart("chart-privacy", [
      { type: "bar", orientation: "h", y: labels, x: series.privacy.map((p) => p.job),
        name: "ε this job", hovertext: names, marker: { color: palette.spent_this_job } },
      { type: "bar", orientation: "h", y: labels, x: series.privacy.map((p) => p.spent),
        name: "ε all jobs", hovertext: names, marker: { color: palette.spent_all_jobs } },
      // The cap as a line across the plot, with a legend entry of its own.
      { type: "scatter", mode: "lines", x: [null], y: [null], name: cap === null ? "cap" : `cap: ε ${cap}`,
        line: { color: palette.cap, dash: "dash", width: 2 } },
    ], {
      barmode: "group", height: barChartHeight(names.length, 2),
      xaxis: axis("ε (privacy loss)", { range: [0, top] }),
      yaxis: axis("", { autorange: "reversed" }),
      shapes: cap === null ? [] : [{ type: "line", yref: "paper", y0: 0, y1: 1, x0: cap, x1: cap,
        line: { color: palette.cap, dash: "dash", width: 2 } }],
    });
    const scores = series.contribution.map((c) => c.score);
    const scored = scores.some((v) => v !== null);
    const scoredNames = series.contribution.map((c) => c.institution);
    chart("chart-contribution", [{
      type: "bar", orientation: "h", y: shortLabels(scoredNames), x: scores, name: "score",
      hovertext: scoredNames,
      marker: { color: series.contribution.map((c, i) => colourOf(c.institution, i)) },
    }], {
      height: barChartHeight(scoredNames.length, 1),
      xaxis: axis("contribution score", scored ? {} : { range: [-1, 1] }),
      yaxis: axis("", { autorange: "reversed" }),
      annotations: scored ? [] : note("not scored yet"),
    });
  }

  // Bar labels short enough to leave the plot its room (the full name is in the hover text and
  // the tables); the full names where shortening would make two alike.
  function shortLabels(names) {
    const short = names.map((n) => (n.length > 22 ? `${n.slice(0, 21).trimEnd()}…` : n));
    return new Set(short).size === short.length ? short : names;
  }

  // Tall enough for every institution's bars, whatever their number.
  function barChartHeight(count, barsEach) {
    return Math.max(260, 110 + count * (14 * barsEach + 12));
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
    renderCharts(state.series, job.rounds_closed);
  }

  function addEntries(entries) {
    const list = $("live-activity");
    for (const e of entries) {
      // In words, at the server's clock with its zone named (the page's other times use it).
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.className = "event-code";
      code.textContent = e.event;
      li.append(`${e.time_text} · ${e.words} `, code);
      list.prepend(li);
    }
    while (list.children.length > 20) list.lastElementChild.remove();
  }

  // Sections rendered by the server (the heading's state, the decisions, contributions, history)
  // are swapped in place by htmx after a change: the hidden #live-refresher asks for this page
  // once (hx-select + hx-select-oob pick the sections out of it), so the whole page stays current
  // without a reload. Debounced: a round closing writes several entries at once.
  //
  // A change is either new entries or a job state the sections were not drawn for: the first
  // message after a reconnect carries no entries (what was written while the socket was down is
  // not replayed), yet the job may have moved on meanwhile. A refresh that fails (the server
  // busy or restarting, the network gone) is tried again, less often each time, until one
  // succeeds: otherwise the heading would go on saying "Running" under a completed job's charts.
  const refresher = $("live-refresher");
  const REFRESH_DEBOUNCE_MS = 400;
  const REFRESH_RETRY_MAX_MS = 30000;
  let refreshTimer = null;
  let refreshFailures = 0;
  const sectionsKeyOf = (state) => `${state.job.state}:${state.job.rounds_closed}`;
  let sectionsKey = null;

  function scheduleRefresh(delay = REFRESH_DEBOUNCE_MS) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => {
      if (window.htmx && refresher) window.htmx.trigger(refresher, "live-refresh");
    }, delay);
  }
  if (refresher) {
    refresher.addEventListener("htmx:afterRequest", (event) => {
      if (event.detail.successful) { refreshFailures = 0; return; }
      refreshFailures += 1;
      scheduleRefresh(Math.min(1000 * 2 ** refreshFailures, REFRESH_RETRY_MAX_MS));
    });
  }
  document.body.addEventListener("htmx:afterSettle", () => {
    root.dataset.refreshed = String(Number(root.dataset.refreshed || 0) + 1);
  });

  // Heartbeats write no ledger entry, so nothing wakes the socket when a worker goes quiet:
  // while the job may be waiting, ask for a fresh state every half-minute ("offline for 4 min"
  // keeps counting, a worker that stopped shows as offline).
  const WAITING_REFRESH_MS = 30000;
  let socket = null;
  let reopened = false;
  setInterval(() => {
    const waiting = ["approved", "running"].includes(root.dataset.jobState);
    if (waiting && socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "refresh" }));
    }
  }, WAITING_REFRESH_MS);

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}${root.dataset.liveUrl}`);
    socket.onopen = () => {
      retry = 500; text(statusEl, "updates live"); root.dataset.live = "open";
      // Back after a drop: decisions and entries written meanwhile are not replayed.
      if (reopened) scheduleRefresh();
      reopened = true;
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "state") return;
      render(message.state);
      addEntries(message.entries);
      const key = sectionsKeyOf(message.state);
      if (message.entries.length || key !== sectionsKey) scheduleRefresh();
      sectionsKey = key;
    };
    socket.onclose = (event) => {
      root.dataset.live = "closed";
      if (event.code === 4403) { text(statusEl, "live updates stopped: access refused"); return; }
      // The session has ended (idle or too old): reloading lands on the sign-in page.
      if (event.code === 4401) { location.reload(); return; }
      text(statusEl, "reconnecting…");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 15000);
    };
  }

  const initial = JSON.parse($("live-state").textContent);
  sectionsKey = sectionsKeyOf(initial);
  render(initial);
  connect();
})();
