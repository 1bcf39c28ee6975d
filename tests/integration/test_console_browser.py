"""The web console in a real browser on the full local stack: Debian's chromium driven by playwright, through
`upcfan console` (the authenticated local proxy) to the invoker-gated api function.

Each scenario uploads its own file of fresh UPCs and steers the sandbox marketplace per GTIN only (the
`gtin_faults` fixture of test_api_stack.py), so sessions sharing the stack are not disturbed. Waits are
polls with deadlines (playwright's `expect` polls too).

UPCFAN_CONSOLE_SCREENSHOT=path saves a screenshot of a finished job's page there (docs/console.png).
"""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

import pytest
import requests

from devstack.identity import OPERATOR_EMAIL
from devstack.testing import fresh_upcs, gtin14, operator_session, poll
from tests.integration.test_api_stack import STALLED_CALL_MS, gtin_faults, upload_job  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
UPCFAN = REPO_ROOT / ".venv" / "bin" / "upcfan"
CHROMIUM = os.environ.get("UPCFAN_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags chromium keeps calling home, which this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FINAL = {"completed", "completed_with_failures", "cancelled", "failed"}


@pytest.fixture(scope="module")
def console_url(stack_env, tmp_path_factory):
    """`upcfan console --no-browser` on this stack: the URL it prints (its first stdout line)."""
    if not UPCFAN.exists():
        pytest.fail(f"{UPCFAN} is missing: run scripts/bootstrap")
    env_file = tmp_path_factory.mktemp("console") / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack_env.items()))
    env = {k: v for k, v in os.environ.items() if k != "UPCFAN_LOCAL_DIR"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen([str(UPCFAN), "--env-file", str(env_file), "console", "--no-browser"], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def printed_url():
        if proc.poll() is not None:
            raise AssertionError(f"upcfan console exited {proc.returncode}: {proc.stderr.read()}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        return proc.stdout.readline().strip() if ready else None

    try:
        url = poll(printed_url, 60, 0.1, "upcfan console to print its URL")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/"), url
        yield url.rstrip("/")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/bootstrap installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    page.set_default_timeout(30_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def api(stack_env):
    session = operator_session(stack_env)
    base = stack_env["UPCFAN_API_URL"].rstrip("/")

    class Api:
        def view(self, job_id: str) -> dict | None:
            try:  # a cold or busy function may answer slowly: the caller's poll asks again until its deadline
                r = session.get(f"{base}/api/batch/status/{job_id}", timeout=30)
            except requests.RequestException:
                return None
            return r.json() if r.status_code == 200 else None

        def wait(self, job_id: str, ok, what: str, timeout_s: float = 120.0) -> dict:
            return poll(lambda: (lambda v: v if v and ok(v) else None)(self.view(job_id)), timeout_s, 0.3,
                        f"job {job_id}: {what}")

        def events(self, job_id: str) -> list[dict]:
            return session.get(f"{base}/api/batch/jobs/{job_id}/events", timeout=10).json()["events"]

    return Api()


def _progress_value(page, job_id: str) -> int:
    return int(float(page.locator(f"#progress-{job_id}").get_attribute("value") or 0))


def test_the_jobs_list_shows_a_job_from_the_stack_and_filters_by_path(page, console_url, upload, api):
    upcs = fresh_upcs(2)
    bucket, name, generation = upload("\n".join(upcs) + "\n", content_type="text/plain",
                                      metadata={"upcfan-handler": "dry_run"})
    from shared.naming import job_id_for

    job_id = job_id_for(bucket, name, generation)
    api.wait(job_id, lambda v: v["status"] in FINAL, "finished")

    row = page.locator(f'tr[data-job-id="{job_id}"]')

    def listed() -> bool:  # jobs of other sessions may be created meanwhile: newest first, ours on page 1
        page.goto(console_url + "/")
        return row.count() == 1

    poll(listed, 30, 0.5, "the job in the newest-first list")
    assert "completed" in row.inner_text() and "2 of 2 finished" in row.inner_text()

    page.get_by_label("File (gs:// path)").fill(f"gs://{bucket}/{name}")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(lambda url: "gcs_path=" in url)
    assert page.locator("tr[data-job-id]").count() == 1 and row.count() == 1
    row.get_by_role("link", name=job_id).click()
    page.wait_for_url(lambda url: url.endswith(f"/jobs/{job_id}"))
    assert page.get_by_role("heading", level=1).inner_text() == f"Job {job_id}"
    assert page.get_by_role("link", name="Download the results (CSV)").get_attribute("href") == \
        f"/api/batch/jobs/{job_id}/results.csv"


def test_progress_moves_on_the_page_while_the_job_runs(page, console_url, upload, api, gtin_faults):
    upcs = fresh_upcs(5)
    # Staggered marketplace latencies (each under the handler's read timeout): items finish one by one.
    gtin_faults(latency={gtin14(u): 1500 * i for i, u in enumerate(upcs)})
    job_id = upload_job(upload, upcs)
    api.wait(job_id, lambda v: v["status"] == "running" and v.get("fanout_done_at"), "fanned out")

    page.goto(f"{console_url}/jobs/{job_id}")
    first = _progress_value(page, job_id)
    assert first < len(upcs), "the job finished before the page could watch it"
    assert page.locator("body").get_attribute("data-live") == "true"
    # No reload by the test: the page's own refresh moves the bar and, at the end, the status.
    poll(lambda: _progress_value(page, job_id) > first, 60, 0.3, "the progress bar to move")
    poll(lambda: "completed" in page.locator(".summary .status").inner_text(), 90, 0.3, "the page to say completed")
    assert _progress_value(page, job_id) == len(upcs)
    assert page.locator("body").get_attribute("data-live") == "false"
    assert page.locator('td[data-count="succeeded"]').inner_text() == str(len(upcs))
    assert page.locator("svg.chart polyline").count() == 1


def test_failed_items_are_grouped_by_error_code_with_lines_and_messages(page, console_url, upload, api,
                                                                        gtin_faults):
    upcs = fresh_upcs(4)
    gtin_faults(fail={gtin14(upcs[1]): 400, gtin14(upcs[3]): 400})
    job_id = upload_job(upload, upcs)
    view = api.wait(job_id, lambda v: v["status"] in FINAL and not v["counts"]["processing"], "finished")
    assert view["status"] == "completed_with_failures"

    page.goto(f"{console_url}/jobs/{job_id}")
    tables = page.locator("table[data-error-code]")
    assert tables.count() == 1
    code = tables.first.get_attribute("data-error-code")
    assert code and code != "unknown"
    assert f"{code}: 2 items" in tables.first.locator("caption").inner_text()
    rows = tables.first.locator("tbody tr")
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(2)] == ["2", "4"]  # file lines
    assert "rejects this product" in rows.first.inner_text() and upcs[1] in rows.first.inner_text()
    assert page.get_by_role("button", name="Retry failed items (2)").is_visible()
    shot = os.environ.get("UPCFAN_CONSOLE_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_an_action_needs_its_confirmation_and_is_recorded_as_the_operator(page, console_url, upload, api,
                                                                           gtin_faults):
    upcs = fresh_upcs(2)
    gtin_faults(latency={gtin14(upcs[1]): STALLED_CALL_MS})  # never finishes: the job runs until cancelled
    job_id = upload_job(upload, upcs)
    api.wait(job_id, lambda v: v["status"] == "running" and v.get("fanout_done_at"), "fanned out")

    page.goto(f"{console_url}/jobs/{job_id}")
    dialog = page.locator("dialog#confirm")
    cancel = page.get_by_role("button", name="Cancel job")
    cancel.click()
    assert dialog.is_visible()
    text = page.locator("#confirm-text").inner_text()
    assert text.startswith(f"Cancel job {job_id}:") and "open item" in text and "cannot be undone" in text
    page.get_by_role("button", name="Keep as is").click()
    assert not dialog.is_visible()
    assert page.locator("#action-result").inner_text() == "Nothing was done."
    assert api.view(job_id)["status"] == "running"

    # Keyboard only: the button takes focus, Enter opens the dialog, Escape dismisses it.
    page.get_by_role("button", name="Cancel job").focus()
    page.keyboard.press("Enter")
    assert dialog.is_visible()
    assert page.evaluate("document.activeElement.id") == "confirm-no"  # the safe choice has focus
    page.keyboard.press("Escape")
    assert not dialog.is_visible() and api.view(job_id)["status"] == "running"

    page.get_by_role("button", name="Cancel job").click()
    page.locator("#confirm-yes").click()
    api.wait(job_id, lambda v: v["status"] == "cancelled", "cancelled by the console", 30)
    poll(lambda: "Cancelled" in page.locator("#action-result").inner_text(), 30, 0.2, "the result message")
    cancelled = [e for e in api.events(job_id) if e["type"] == "cancelled"]
    assert [e["actor"] for e in cancelled] == [OPERATOR_EMAIL]  # the proxy's token, verified by the gate


def test_a_post_from_another_origin_is_refused(page, console_url, upload, api, gtin_faults):
    """CSRF: a page of another site posts to the proxy without the console's header; the proxy adds the
    operator's token, the api still refuses (Sec-Fetch-Site: cross-site)."""
    upcs = fresh_upcs(1)
    gtin_faults(latency={gtin14(upcs[0]): STALLED_CALL_MS})
    job_id = upload_job(upload, upcs)
    api.wait(job_id, lambda v: v["status"] == "running" and v.get("fanout_done_at"), "fanned out")
    # The classic forgery: a page of another site (served here by the browser's request interception, so
    # without the console's Content-Security-Policy) whose form posts to the console's address.
    target = f"{console_url}/api/batch/jobs/{job_id}/cancel"
    evil = f'<form id="f" method="POST" action="{target}"><input name="x" value="1" aria-label="x"></form>'
    page.route("http://attacker.test/", lambda route: route.fulfill(status=200, content_type="text/html", body=evil))
    page.goto("http://attacker.test/")
    with page.expect_navigation(url=target):
        page.evaluate("document.getElementById('f').submit()")
    assert page.url == f"{console_url}/api/batch/jobs/{job_id}/cancel"
    assert '"forbidden_origin"' in page.content()
    assert api.view(job_id)["status"] == "running"
    with operator_session() as s:  # tidy up: the stalled item would keep the job running
        s.post(f"{os.environ['UPCFAN_API_URL'].rstrip('/')}/api/batch/jobs/{job_id}/cancel", timeout=30)


def test_every_form_control_has_a_label_and_the_skip_link_comes_first(page, console_url):
    page.goto(console_url + "/")
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !(el.innerText || '').trim())
        .map(el => el.outerHTML)""")
    assert unlabelled == []
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    assert page.locator("html").get_attribute("lang") == "en"
