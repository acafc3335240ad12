// The run page: follows the log over SSE (GET /tasks/{id}/logs), resuming after a drop from
// the last line it got; keeps the state, timings and result current (GET /tasks/{id}); and
// cancels (DELETE /tasks/{id}) after a confirmation. Every value from the task is written
// with textContent, never as HTML.
"use strict";

(function () {
  const section = document.getElementById("run");
  if (!section) return;
  const taskId = section.dataset.taskId;
  const base = "/tasks/" + encodeURIComponent(taskId);
  const FINAL = ["completed", "archived", "canceled"];
  const logEl = document.getElementById("log");
  const statusEl = document.getElementById("log-status");
  const followNote = document.getElementById("follow-note");
  // Colour and cursor escapes (CSI sequences) and OSC titles: stripped, shown as plain text.
  const ANSI = /\u001b\[[0-9;?]*[ -\/]*[@-~]|\u001b\][^\u0007\u001b]*(?:\u0007|\u001b\\)/g;

  let lastId = null;
  let source = null;
  let ended = false;
  let follow = true;

  function atBottom() {
    return logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 8;
  }

  logEl.addEventListener("scroll", function () {
    follow = atBottom();
    followNote.textContent = follow ? "" : "auto-scroll paused: scroll to the bottom to resume";
  });

  function append(text, kind) {
    const line = document.createElement("span");
    line.className = "line " + kind;
    line.textContent = text.replace(ANSI, "") + "\n";
    if (kind === "stderr") line.title = "stderr";
    logEl.appendChild(line);
    if (follow) logEl.scrollTop = logEl.scrollHeight;
  }

  function connect() {
    let url = base + "/logs?stderr=event";
    if (lastId) url += "&last_event_id=" + encodeURIComponent(lastId);
    source = new EventSource(url);
    statusEl.textContent = "following";
    const onLine = function (kind) {
      return function (event) {
        if (event.lastEventId) lastId = event.lastEventId;
        append(event.data, kind);
      };
    };
    source.addEventListener("message", onLine("stdout"));
    source.addEventListener("stderr", onLine("stderr"));
    source.addEventListener("gap", function (event) {
      const lost = JSON.parse(event.data).lost;
      append("[aqsh] " + lost + " log lines lost (trimmed by the log's length cap)", "gap");
    });
    source.addEventListener("eof", function (event) {
      ended = true;
      source.close();
      statusEl.textContent = "ended, exit code " + event.data;
      refresh();
    });
    source.onerror = function () {
      if (ended) return;
      // The browser retries by itself (sending Last-Event-ID) while the stream is merely
      // interrupted; after an HTTP error it gives up, so a new one starts from lastId.
      if (source.readyState === EventSource.CLOSED) {
        statusEl.textContent = "reconnecting…";
        setTimeout(connect, 2000);
      } else {
        statusEl.textContent = "reconnecting…";
      }
    };
    source.onopen = function () { statusEl.textContent = "following"; };
  }

  function setField(name, value) {
    const el = section.querySelector('[data-field="' + name + '"]');
    if (el) el.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
  }

  function showResult(result) {
    const box = document.getElementById("result");
    box.replaceChildren();
    if (!result) return;
    const p = document.createElement("p");
    p.append("exit code ");
    const code = document.createElement("b");
    code.id = "exit-code";
    code.textContent = result.exit_code === undefined ? "—" : String(result.exit_code);
    p.append(code);
    if (result.error) {
      const err = document.createElement("span");
      err.className = "error-text";
      err.textContent = " · " + result.error;
      p.append(err);
    }
    box.append(p);
    if (typeof result.data === "string") {
      const pre = document.createElement("pre");
      pre.id = "result-data";
      pre.className = "data";
      try {
        pre.textContent = JSON.stringify(JSON.parse(result.data), null, 2);
        pre.classList.add("json");
      } catch (e) {
        pre.textContent = result.data;
      }
      box.append(pre);
    }
  }

  let refreshing = null;
  async function refresh() {
    try {
      const response = await fetch(base, { credentials: "same-origin" });
      if (!response.ok) return;
      const doc = await response.json();
      const state = document.getElementById("state");
      state.textContent = doc.state;
      state.className = "state state-" + doc.state;
      for (const f of ["started_at", "finished_at", "next_process_at", "retries", "last_error"]) {
        setField(f, doc[f]);
      }
      if (FINAL.includes(doc.state)) {
        showResult(doc.result);
        const cancel = document.getElementById("cancel");
        if (cancel) cancel.remove();
        if (refreshing) clearInterval(refreshing);
        refreshing = null;
      }
    } catch (e) {
      // a failed poll is retried by the next tick
    }
  }

  const cancel = document.getElementById("cancel");
  if (cancel) {
    cancel.addEventListener("click", async function () {
      if (!window.confirm("Cancel this run of " + taskId + "?")) return;
      const errorEl = document.getElementById("action-error");
      errorEl.textContent = "";
      cancel.disabled = true;
      try {
        const response = await fetch(base, {
          method: "DELETE", headers: { "X-Aqsh-Csrf": "1" }, credentials: "same-origin",
        });
        if (!response.ok && response.status !== 202) {
          const body = await response.json().catch(function () { return {}; });
          errorEl.textContent = (body.error && body.error.message) || "HTTP " + response.status;
          cancel.disabled = false;
        }
      } catch (e) {
        errorEl.textContent = "the request failed: " + e;
        cancel.disabled = false;
      }
      refresh();
    });
  }

  connect();
  if (section.dataset.final !== "true") refreshing = setInterval(refresh, 1500);
})();
