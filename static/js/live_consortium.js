// Consortium dashboard: jobs by state, approvals awaited, running jobs and (for those who may read
// the ledger) recent entries, redrawn from the consortium's websocket.
(function () {
  "use strict";
  const root = document.getElementById("consortium-live");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const slug = root.dataset.liveUrl.split("/")[3];
  let retry = 500;

  function list(id, items, empty, fill) {
    const ul = $(id);
    ul.replaceChildren();
    if (!items.length) {
      const li = document.createElement("li"); li.className = "muted"; li.textContent = empty;
      ul.appendChild(li); return;
    }
    for (const item of items) { const li = document.createElement("li"); fill(li, item); ul.appendChild(li); }
  }

  function render(state) {
    list("jobs-by-state", state.jobs_by_state, "No job yet.", (li, s) => {
      li.dataset.state = s.state; li.textContent = `${s.label}: ${s.count}`;
    });
    list("approvals-owed", state.approvals_owed, "None.", (li, o) => {
      li.textContent = `${o.institution}: ${o.count} job${o.count === 1 ? "" : "s"}`;
    });
    list("running-jobs", state.running, "Nothing running.", (li, j) => {
      const a = document.createElement("a");
      a.href = `/consortia/${slug}/jobs/${j.id}/`; a.textContent = `#${j.id} ${j.title}`;
      const bar = document.createElement("progress");
      bar.max = j.rounds_total || 1; bar.value = j.rounds_closed;
      bar.setAttribute("aria-label", `Rounds closed of job ${j.id}`);
      li.append(a, " ", bar, ` ${j.rounds_closed}/${j.rounds_total}`);
    });
  }

  function addEntries(entries) {
    const table = $("recent-entries");
    if (!table || !entries.length) return;
    const body = table.tBodies[0];
    if (body.querySelector("td.muted")) body.replaceChildren();
    for (const e of entries) {
      const tr = document.createElement("tr");
      const what = document.createElement("span");
      const code = document.createElement("code"); code.className = "event-code"; code.textContent = e.event;
      what.append(e.words, document.createElement("br"), code);
      const when = e.time.replace("T", " ").slice(0, 10) + " " + e.time_text;
      const cells = [String(e.seq), when, what, e.actor, e.institution_name || "—"];
      for (const c of cells) { const td = document.createElement("td"); td.append(c); tr.appendChild(td); }
      body.prepend(tr);
    }
    while (body.rows.length > 20) body.lastElementChild.remove();
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${root.dataset.liveUrl}`);
    socket.onopen = () => { retry = 500; $("consortium-live-status").textContent = "· updates live"; };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "state") return;
      render(message.state);
      addEntries(message.entries);
    };
    socket.onclose = (event) => {
      if (event.code === 4403) return;
      // The session has ended (idle or too old): reloading lands on the sign-in page.
      if (event.code === 4401) { location.reload(); return; }
      $("consortium-live-status").textContent = "· reconnecting…";
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 15000);
    };
  }
  connect();
})();
