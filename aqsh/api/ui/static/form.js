// The run form: checks each field in the browser (the same rules the server checks again),
// posts the inputs as JSON to POST /tasks/{name}, shows the API's 422 details next to their
// fields, and goes to the run page once the task is accepted.
"use strict";

(function () {
  const form = document.getElementById("run-form");
  if (!form) return;
  const task = form.dataset.task;

  function slot(name) {
    return document.getElementById("err-" + name);
  }

  function clearErrors() {
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
    document.getElementById("form-error").textContent = "";
  }

  function showError(name, message) {
    const target = slot(name);
    const field = form.querySelector('[data-field="' + CSS.escape(name) + '"]');
    if (field) field.classList.add("invalid");
    if (target) {
      target.textContent = target.textContent ? target.textContent + "; " + message : message;
    } else {
      const general = document.getElementById("form-error");
      general.textContent = (name ? name + ": " : "") + message;
    }
  }

  // Chromium compiles the pattern attribute with the "v" flag, which refuses some patterns
  // Python accepts ([a-z_-] for one); they are checked here with "u" as the server would.
  function patternFails(input) {
    const pattern = input.getAttribute("pattern");
    if (!pattern || input.value === "") return false;
    try {
      return !new RegExp("^(?:" + pattern + ")$", "u").test(input.value);
    } catch (e) {
      return false;  // the server has the last word
    }
  }

  function collect() {
    const values = {};
    let ok = true;
    for (const input of form.querySelectorAll("[data-type]")) {
      const name = input.name;
      if (input.type === "checkbox") {
        values[name] = input.checked;
        continue;
      }
      if (!input.checkValidity()) {
        showError(name, input.validationMessage);
        ok = false;
        continue;
      }
      if (patternFails(input)) {
        showError(name, "must match " + input.getAttribute("pattern"));
        ok = false;
        continue;
      }
      if (input.value === "") continue;  // not given: the server applies the default
      const type = input.dataset.type;
      values[name] = type === "int" || type === "float" ? Number(input.value) : input.value;
    }
    return ok ? values : null;
  }

  function schedule() {
    const when = form.querySelector('input[name="when"]:checked');
    if (!when || when.value === "now") return "";
    if (when.value === "in") {
      const value = document.getElementById("process-in").value.trim();
      return value ? "?process_in=" + encodeURIComponent(value) : "";
    }
    const at = document.getElementById("process-at").value;
    if (!at) return "";
    return "?process_at=" + encodeURIComponent((at.length === 16 ? at + ":00" : at) + "Z");
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    clearErrors();
    const values = collect();
    if (values === null) return;
    const button = document.getElementById("submit");
    button.disabled = true;
    try {
      const response = await fetch("/tasks/" + encodeURIComponent(task) + schedule(), {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Aqsh-Csrf": "1" },
        body: JSON.stringify(values),
        credentials: "same-origin",
      });
      const body = await response.json().catch(function () { return {}; });
      if (response.status === 202) {
        window.location.assign("/ui/runs/" + encodeURIComponent(body.id));
        return;
      }
      const error = body.error || { message: "HTTP " + response.status };
      if (response.status === 422 && Array.isArray(error.details)) {
        for (const detail of error.details) showError(detail.field, detail.message);
      } else if (error.code === "invalid_schedule") {
        slot("schedule").textContent = error.message;
      } else {
        document.getElementById("form-error").textContent = error.message;
      }
    } catch (e) {
      document.getElementById("form-error").textContent = "the request failed: " + e;
    } finally {
      button.disabled = false;
    }
  });
})();
