// The upcfan console's only script: live refresh of a page while its job runs, and the operator
// actions behind a confirmation. Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

(function () {
  const CONSOLE_HEADER = "X-Upcfan-Console";  // the API refuses a browser's POST without it (CSRF defence)
  const body = document.body;
  let refreshing = false;

  function announce(text) {
    const region = document.getElementById("announce");
    if (region) region.textContent = text;
  }

  // Reload this page and swap in its #live part, keeping focus on the same control when it is still there.
  async function refresh() {
    const dialog = document.getElementById("confirm");
    if (refreshing || (dialog && dialog.open)) return;
    refreshing = true;
    try {
      const response = await fetch(window.location.href, { headers: { Accept: "text/html" }, cache: "no-store" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      const next = fresh.getElementById("live");
      const current = document.getElementById("live");
      if (!next || !current) return;
      const focused = document.activeElement && current.contains(document.activeElement)
        ? document.activeElement.getAttribute("data-action") : null;
      current.replaceWith(next);
      bindActions(next);
      if (focused) {
        const again = next.querySelector(`[data-action="${focused}"]`);
        if (again) again.focus();
      }
      body.dataset.live = fresh.body.dataset.live;
      if (fresh.body.dataset.live !== "true") announce("The job has finished.");
    } catch (err) {
      // A failed refresh is retried at the next tick; the page stays as it was.
    } finally {
      refreshing = false;
    }
  }

  function scheduleRefresh() {
    const every = parseInt(body.dataset.refreshMs || "5000", 10);
    window.setInterval(() => { if (body.dataset.live === "true") refresh(); }, every);
  }

  async function post(jobId, action, payload) {
    const response = await fetch(`/api/batch/jobs/${encodeURIComponent(jobId)}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", [CONSOLE_HEADER]: "1" },
      body: JSON.stringify(payload || {}),
      cache: "no-store",
    });
    let data = {};
    try { data = await response.json(); } catch (err) { data = {}; }
    if (!response.ok) {
      const error = data.error || {};
      throw new Error(`${error.code || response.status}: ${error.message || response.statusText}`);
    }
    return data;
  }

  // Ask in the page's <dialog>; resolves true only when the operator chose "Do it".
  function confirmAction(text, yesLabel) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-yes").textContent = yesLabel;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  function describe(action, data) {
    switch (action) {
      case "cancel": return `Cancelled: ${data.items_cancelled} queued items cancelled now` +
        (data.items_left_to_deliveries ? "; the rest are cancelled as their tasks arrive." : ".");
      case "pause": return data.already_paused ? "The job was already paused." : "Paused.";
      case "resume": return data.already_running ? "The job was already running." : `Resumed (${data.status}).`;
      case "retry-failed": return `Retry round ${data.round}: ${data.items_requeued} failed items queued again.`;
      case "redrive": return `Re-drive ${data.redrive}: ${data.tasks_created} new tasks` +
        (data.tasks_failed ? `, ${data.tasks_failed} failed to be created.` : ".");
      default: return "Done.";
    }
  }

  async function onAction(event) {
    const button = event.currentTarget;
    const action = button.dataset.action;
    const jobId = button.dataset.jobId;
    const result = document.getElementById("action-result");
    let text = button.dataset.confirm;
    let payload = {};
    try {
      if (action === "redrive") {
        const dry = await post(jobId, "redrive", { dry_run: true });
        if (!dry.stranded) {
          result.textContent = `Job ${jobId}: none of the ${dry.examined} open items checked is stranded; nothing to re-drive.`;
          return;
        }
        text = `Re-drive job ${jobId}: create one new task for each of ${dry.stranded} stranded open items` +
          (dry.next_cursor ? " (of the first page checked; run it again for the rest)" : "") +
          ". Items with a live task are not touched.";
        payload = { dry_run: false };
      }
      if (!(await confirmAction(text, button.textContent.trim()))) {
        result.textContent = "Nothing was done.";
        button.focus();
        return;
      }
      result.textContent = `${button.textContent.trim()}: working…`;
      const data = await post(jobId, action, payload);
      result.textContent = describe(action, data);
      body.dataset.live = "true";
      await refresh();
    } catch (err) {
      result.textContent = `Refused: ${err.message}`;
    }
  }

  function bindActions(root) {
    root.querySelectorAll("button[data-action]").forEach((b) => b.addEventListener("click", onAction));
  }

  bindActions(document);
  scheduleRefresh();
})();
