"""The `upcfan` operator CLI: submit files, watch jobs, list items, pause/resume, cancel, retry failed items, sweep."""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from typer._click.exceptions import UsageError  # typer bundles its own click
from typer.core import TyperGroup

from shared.durations import format_duration
from shared.envfile import load_env_file
from shared.exceptions import ConflictError, NotFoundError, UpcfanError
from shared.required_settings import (BUCKET, CONTROL_QUEUE_NAME, INGEST_URL, ITEM_QUEUE_NAME, ITEM_QUEUE_SHARDS,
                                      LOCATION, PROJECT, SMALL_ITEM_QUEUE_NAME, TASK_SA, WORKER_URL)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_FOUND = 2
EXIT_CONFLICT = 3
EXIT_FAILURES = 4
EXIT_FAILED_OR_CANCELLED = 5

EXIT_CODES_HELP = """\
Exit codes (stable, for scripts):

  0  ok; for status/--watch: job completed (or still running without --watch)

  1  usage error, incomplete or invalid settings (named), or unexpected error

  2  job (or source file) not found

  3  refused: conflict (e.g. retry while the job runs, cancel of a finished job)

  4  job finished with failed items (completed_with_failures)

  5  job failed or was cancelled
"""

# What each command cannot run without (shared/required_settings.py for the functions' own table): it
# refuses with exit 1 before touching anything, naming the variables. A task created without the
# deployed URL, account and queues would be a half-enqueued round (issue 14, defect 10).
COMMAND_SETTINGS = {
    "status": (PROJECT,),
    "jobs": (PROJECT,),
    "items": (PROJECT,),
    "cancel": (PROJECT,),
    "pause": (PROJECT,),
    # a resume asks for a progress check (a job whose items all finished while paused completes)
    "resume": (PROJECT, LOCATION, WORKER_URL, TASK_SA, CONTROL_QUEUE_NAME),
    "events": (PROJECT,),
    "export": (PROJECT,),
    "retry-failed": (PROJECT, LOCATION, WORKER_URL, TASK_SA, ITEM_QUEUE_NAME, ITEM_QUEUE_SHARDS, SMALL_ITEM_QUEUE_NAME,
                     CONTROL_QUEUE_NAME),
    "redrive": (PROJECT, LOCATION, WORKER_URL, TASK_SA, ITEM_QUEUE_NAME, ITEM_QUEUE_SHARDS, SMALL_ITEM_QUEUE_NAME),
    "submit gs://": (PROJECT, LOCATION, INGEST_URL, TASK_SA, CONTROL_QUEUE_NAME),
    "submit FILE": (PROJECT, BUCKET),
    # and the Slack webhook, or its secret, or --no-alerts (see `sweep`)
    "sweep": (PROJECT,),
}

DEFAULT_ENV_FILE = Path(".local/stack.env")
_REPO_ROOT = Path(__file__).resolve().parents[1]

console = Console()
err_console = Console(stderr=True)
_sleep: Callable[[float], None] = time.sleep
_monotonic: Callable[[], float] = time.monotonic


class _ExitCodeGroup(TyperGroup):
    """Usage errors exit 1 (click's default 2 means "job not found" here)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise


app = typer.Typer(
    cls=_ExitCodeGroup,
    help="Operate upcfan jobs: submit, status, jobs, items, events, export, pause, resume, cancel, retry-failed, redrive, "
         "sweep, console; predict a file's time: capacity.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _ops():
    from shared import operations

    return operations


# ---------------------------------------------------------------- environment


def _default_env_file() -> Path | None:
    """The stack.env of the stack devstack would use: UPCFAN_LOCAL_DIR (a second, independent stack),
    else .local/ of the working directory or of this checkout."""
    local_dir = os.environ.get("UPCFAN_LOCAL_DIR")
    candidates = [Path(local_dir) / DEFAULT_ENV_FILE.name] if local_dir else []
    candidates += [Path.cwd() / DEFAULT_ENV_FILE, _REPO_ROOT / DEFAULT_ENV_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


# Where this run's settings came from, named when a command refuses for want of one.
_source = "the environment"
_hint = ""


@app.callback()
def _configure(
    env_file: Optional[Path] = typer.Option(
        None, "--env-file", envvar="UPCFAN_ENV_FILE",
        help="KEY=value settings to use (default: .local/stack.env of the local stack, unless --project)."),
    project: Optional[str] = typer.Option(
        None, "--project",
        help="Production project id: real services (ambient credentials) with the profile scripts/deploy wrote "
             "for it (UPCFAN_CONFIG_DIR/profiles/PROJECT.env, default ~/.config/upcfan/profiles/)."),
    profile: Optional[Path] = typer.Option(
        None, "--profile", help="A deployment profile written by scripts/deploy (instead of --project's default)."),
) -> None:
    global _source, _hint
    from shared.profiles import profile_path

    if profile is not None and env_file is not None:
        raise typer.BadParameter("give either --profile or --env-file", param_hint="--profile")
    deploy_hint = f"scripts/deploy --project {project or 'PROJECT'} ... writes a deployment's profile"
    if profile is not None:
        if not profile.is_file():
            raise typer.BadParameter(f"{profile} does not exist ({deploy_hint})", param_hint="--profile")
        loaded = load_env_file(profile)
        _source, _hint = f"profile {profile}", f"{deploy_hint}; or add them to {profile}"
    elif env_file is not None:
        if not env_file.is_file():
            raise typer.BadParameter(f"{env_file} does not exist", param_hint="--env-file")
        loaded = load_env_file(env_file)
        _source, _hint = f"--env-file {env_file}", f"add them to {env_file}"
    elif project is not None:
        try:
            path = profile_path(project)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--project") from None
        loaded = load_env_file(path) if path.is_file() else {}
        _source = f"profile {path}" if loaded else f"--project {project} (no profile at {path})"
        _hint = f"{deploy_hint} to {path} (or give --profile FILE)"
    else:
        found = _default_env_file()
        loaded = load_env_file(found) if found is not None else {}
        _source = str(found) if found else "the environment (no .local/stack.env: is the local stack up?)"
        _hint = "start the local stack (scripts/dev up writes .local/stack.env), or give --project or --profile"
    if project:
        named = loaded.get("GOOGLE_CLOUD_PROJECT")
        if named and named != project:
            raise typer.BadParameter(f"{_source} is the profile of project {named}, not {project}",
                                     param_hint="--project")
        os.environ["GOOGLE_CLOUD_PROJECT"] = project
    from shared.clients import reset_clients

    reset_clients()


def _require(command: str) -> Any:
    """The validated settings, when they hold everything `command` needs (COMMAND_SETTINGS); else exit 1
    naming what is missing, where the settings came from and how to get them, before anything is touched."""
    from shared.config import SettingsError, settings
    from shared.required_settings import describe_missing, missing

    try:
        s = settings()
    except SettingsError as exc:
        raise _fail(EXIT_ERROR, f"{command}: {exc.message} (settings from {_source})") from None
    gaps = missing(COMMAND_SETTINGS[command], s)
    if gaps:
        raise _fail(EXIT_ERROR, f"{command} needs settings that {_source} does not have: {describe_missing(gaps)}. "
                                f"{_hint}.")
    return s


def _fail(code: int, message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # paths stay whole
    return typer.Exit(code)


def _call(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run a core call; map its errors to the documented exit codes."""
    try:
        return fn(*args, **kwargs)
    except NotFoundError as exc:
        raise _fail(EXIT_NOT_FOUND, exc.message) from None
    except ConflictError as exc:
        raise _fail(EXIT_CONFLICT, exc.message) from None
    except UpcfanError as exc:
        raise _fail(EXIT_ERROR, exc.message) from None
    except Exception as exc:  # noqa: BLE001 - any other fault is "unexpected", exit 1
        raise _fail(EXIT_ERROR, f"{type(exc).__name__}: {exc}") from None


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "cli"


def _print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj, default=str))


# ---------------------------------------------------------------- status rendering


def exit_code_for(status: str | None) -> int:
    return {
        "completed_with_failures": EXIT_FAILURES,
        "failed": EXIT_FAILED_OR_CANCELLED,
        "cancelled": EXIT_FAILED_OR_CANCELLED,
    }.get(status or "", EXIT_OK)


_STATUS_STYLE = {"completed": "green", "completed_with_failures": "yellow", "failed": "red", "cancelled": "magenta",
                 "running": "cyan", "ingesting": "blue", "paused": "bold yellow"}


def render_status(view: dict[str, Any]) -> Group:
    """One job as a renderable: header, progress bar, item counts, rate, ETA and the stall flag."""
    counts = view.get("counts") or {}
    totals = view.get("totals") or {}
    status = view.get("status") or "?"
    total = totals.get("items") if view.get("fanout_done_at") else None
    finished = sum(int(counts.get(k) or 0) for k in ("succeeded", "failed", "cancelled"))
    header = Text.assemble(
        (f"job {view.get('job_id')}", "bold"), "  ",
        (status, _STATUS_STYLE.get(status, "white")), f"  round {view.get('round', 1)}",
        ("  STALLED: " + str((view.get("stall") or {}).get("reason", "")), "bold red") if view.get("stalled") else "",
    )
    pause = view.get("pause") or {}
    if status == "paused":
        header.append(f"\nPAUSED ({pause.get('code', '?')}): {pause.get('message', '')}\n"
                      f"  upcfan resume {view.get('job_id')}   or   upcfan cancel {view.get('job_id')}", "bold yellow")
    bar = ProgressBar(total=float(total or 1), completed=float(finished if total else 0), width=40,
                      pulse=total is None and not view.get("final"))
    pct = view.get("percent")
    progress_row = Table.grid(padding=(0, 1))
    progress_row.add_row(bar, Text(f"{pct:.1f}%" if pct is not None else "planning…"),
                         Text(f"{finished}/{total if total is not None else '?'} items"))
    # One space between columns: the eight counts fit an 80-column terminal without truncated headers.
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False, collapse_padding=True)
    for col in ("queued", "processing", "succeeded", "failed", "cancelled", "never_claimed", "invalid", "duplicate"):
        table.add_column(col, justify="right")
    table.add_row(*(str(counts.get(k, 0) or 0) for k in ("queued", "processing", "succeeded", "failed",
                                                          "cancelled", "never_claimed")),
                  str(totals.get("invalid", 0)), str(totals.get("duplicate", 0)))
    rate = view.get("rate_items_per_s")
    footer = Text(
        f"rate {rate:.1f} items/s" if rate is not None else "rate –",
    )
    footer.append(f"   ETA {format_duration(view.get('eta_s'), exact=True)}")
    footer.append("   stall: ")
    footer.append("YES" if view.get("stalled") else "no", style="bold red" if view.get("stalled") else "green")
    results = view.get("results") or {}
    if results.get("path"):  # the manifest the job's results task wrote (`upcfan export` streams the same)
        missing = f", {results['lines_missing']} line(s) without a record" if results.get("lines_missing") else ""
        return Group(header, progress_row, table, footer, Text(f"results: {results['path']} ({results.get('rows')} rows{missing})"))
    return Group(header, progress_row, table, footer)


def render_summary(view: dict[str, Any]) -> Table:
    """What became of every line of the file."""
    outcome = view.get("outcome") or {}
    table = Table(title=f"summary of {view.get('job_id')} ({view.get('status')})", show_lines=False)
    cols = ("lines", "succeeded", "failed", "invalid", "duplicate", "cancelled")
    for col in cols:
        table.add_column(col, justify="right")
    if outcome.get("pending"):
        table.add_column("pending", justify="right")
    table.add_row(*(str(outcome.get(c, 0)) for c in cols), *([str(outcome["pending"])] if outcome.get("pending") else []))
    return table


def watch_job(job_id: str, interval: float, timeout_s: float | None = None) -> dict[str, Any]:
    """Redraw the job's progress until it is final (or `timeout_s` passes); return the last view."""
    view = _call(_ops().get_job_status, job_id)
    deadline = _monotonic() + timeout_s if timeout_s else None
    with Live(render_status(view), console=console, refresh_per_second=4, transient=False) as live:
        while not view.get("final"):
            if deadline is not None and _monotonic() > deadline:
                break
            _sleep(interval)
            view = _call(_ops().get_job_status, job_id)
            live.update(render_status(view), refresh=True)
    return view


def _dropped_files() -> dict[str, Any]:
    from shared.operations import dropped_file_mode

    return dropped_file_mode()


def _mode_line() -> str:
    """What dropped files run in this deployment (issue 14, defect 9: production quietly ran dry)."""
    mode = _dropped_files()
    if mode["mode"] == "unset":
        return f"dropped files: mode unknown (UPCFAN_DEFAULT_HANDLER is not in {_source})"
    what = "LIVE" if mode["mode"] == "live" else "DRY RUN"
    return f"dropped files: {what} (default handler {mode['default_handler']})"


def _finish(view: dict[str, Any], as_json: bool, with_mode: bool = False) -> None:
    if as_json:
        _print_json({**view, "dropped_files": _dropped_files()} if with_mode else view)
    else:
        console.print(render_summary(view))
    raise typer.Exit(exit_code_for(view.get("status")))


# ---------------------------------------------------------------- commands


@app.command()
def status(
    job_id: str = typer.Argument(..., help="job id"),
    watch: bool = typer.Option(False, "--watch", "-w", help="redraw a live progress bar until the job is final"),
    as_json: bool = typer.Option(False, "--json", help="print the status document as JSON"),
    interval: float = typer.Option(2.0, "--interval", min=0.1, help="seconds between polls with --watch"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="stop watching after this many seconds"),
) -> None:
    """Show a job's progress; exit code follows the job (0 completed/running, 4 failures, 5 failed/cancelled)."""
    _require("status")
    if not as_json:
        console.print(_mode_line(), highlight=False)
    if watch and not as_json:
        view = watch_job(job_id, interval, timeout)
    elif watch:
        view = _call(_ops().get_job_status, job_id)
        deadline = _monotonic() + timeout if timeout else None
        while not view.get("final") and (deadline is None or _monotonic() < deadline):
            _sleep(interval)
            view = _call(_ops().get_job_status, job_id)
    else:
        view = _call(_ops().get_job_status, job_id)
        if not as_json:
            console.print(render_status(view))
    _finish(view, as_json, with_mode=True)


@app.command()
def jobs(
    status_filter: Optional[str] = typer.Option(None, "--status", help="only jobs in this status"),
    limit: int = typer.Option(20, "--limit", min=1, max=100),
    gcs_path: Optional[str] = typer.Option(None, "--gcs-path", help="only jobs of this gs:// object"),
    cursor: Optional[str] = typer.Option(None, "--cursor", help="next_cursor of a previous page"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs, newest first."""
    _require("jobs")
    page = _call(_ops().list_jobs, limit=limit, status=status_filter, gcs_path=gcs_path, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    table = Table(title="jobs (newest first)")
    table.add_column("job_id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("round", "lines", "items", "failed", "stall"):
        table.add_column(col, justify="right")
    table.add_column("created_at", no_wrap=True)
    table.add_column("gcs_path", overflow="fold")
    for job in page["jobs"]:
        totals = job.get("totals") or {}
        counts = job.get("counts") or {}
        table.add_row(job["job_id"], Text(job.get("status") or "", _STATUS_STYLE.get(job.get("status") or "", "")),
                      str(job.get("round") or 1), str(totals.get("lines", "")), str(totals.get("items", "")),
                      str(counts.get("failed", "")), "yes" if job.get("stall") else "",
                      str(job.get("created_at") or "")[:19], job.get("gcs_path") or "")
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"more: --cursor {page['next_cursor']}")


_ITEM_COLUMNS = ("gtin", "upc", "line", "status", "round", "attempt", "error_code", "error_message")
_LINE_COLUMNS = ("line", "raw", "outcome", "code", "reason", "gtin", "duplicate_of_line")


def _item_row(item: dict[str, Any]) -> list[str]:
    error = item.get("error") or {}
    values = {**item, "error_code": error.get("code"), "error_message": error.get("message")}
    return ["" if values.get(c) is None else str(values.get(c)) for c in _ITEM_COLUMNS]


@app.command()
def items(
    job_id: str = typer.Argument(...),
    status_filter: Optional[str] = typer.Option(
        None, "--status", help="queued|processing|succeeded|failed|cancelled, or invalid|duplicate for line records"),
    limit: int = typer.Option(1000, "--limit", min=1, help="at most this many rows (pages are followed)"),
    as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List a job's items (failed ones with their errors) or its invalid/duplicate lines."""
    _require("items")
    rows: list[dict[str, Any]] = []
    cursor = None
    kind = "items"
    while len(rows) < limit:
        page = _call(_ops().list_items, job_id, status=status_filter, limit=min(1000, limit - len(rows)),
                     cursor=cursor)
        kind = page.get("kind", "items")
        rows += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if as_json:
        _print_json({"job_id": job_id, "status": status_filter, "kind": kind, "items": rows})
        return
    columns = _LINE_COLUMNS if kind == "lines" else _ITEM_COLUMNS
    table_rows = ([["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows] if kind == "lines"
                  else [_item_row(r) for r in rows])
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(table_rows)
        return
    table = Table(title=f"{job_id}: {status_filter or 'all'} {kind} ({len(rows)})")
    for col in columns:
        table.add_column(col)
    for r in table_rows:
        table.add_row(*r)
    console.print(table)


def _event_details(details: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                     for k, v in details.items())


@app.command()
def events(
    job_id: str = typer.Argument(...),
    limit: int = typer.Option(500, "--limit", min=1, help="at most this many events (pages are followed)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A job's event history, oldest first: who did what when."""
    _require("events")
    rows: list[dict[str, Any]] = []
    cursor = None
    while len(rows) < limit:
        page = _call(_ops().list_events, job_id, limit=min(500, limit - len(rows)), cursor=cursor)
        rows += page["events"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if as_json:
        _print_json({"job_id": job_id, "events": rows})
        return
    table = Table(title=f"{job_id}: events ({len(rows)}, oldest first)")
    table.add_column("at", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("actor", overflow="fold")
    table.add_column("details", overflow="fold")
    for e in rows:
        table.add_row(str(e.get("at") or "")[:23], e.get("type") or "", e.get("actor") or "",
                      _event_details(e.get("details") or {}))
    console.print(table)


def _write_pieces(out, pieces) -> None:
    for piece in pieces:  # a page of rows at a time: memory stays bounded whatever the job's size
        out.write(piece)


@app.command()
def export(
    job_id: str = typer.Argument(...),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write here instead of stdout"),
) -> None:
    """The job's results manifest as CSV (line,upc,gtin,status,error_code,error_message,offer_id), streamed
    from the store: the rows the results task writes to gs://BUCKET/results/JOB.csv."""
    _require("export")
    pieces = _call(_ops().export_results, job_id)
    out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        _call(_write_pieces, out, pieces)
    finally:
        if output:
            out.close()


@app.command()
def cancel(job_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Cancel a running job (idempotent). Remaining tasks drain as no-ops; refused (3) for finished jobs."""
    _require("cancel")
    out = _call(_ops().cancel_job, job_id, _actor())
    if as_json:
        _print_json(out)
    elif out.get("already_cancelled"):
        console.print(f"job {job_id} was already cancelled")
    else:
        console.print(f"job {job_id} cancelled; {out.get('items_cancelled', 0)} queued items cancelled")
        if out.get("items_left_to_deliveries"):
            console.print("more queued items remain: each is cancelled when its task is next delivered "
                          "(no side effect runs for a cancelled job)")


@app.command()
def pause(
    job_id: str = typer.Argument(...),
    reason: Optional[str] = typer.Option(None, "--reason", help="why, for the job's events and the alert"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pause a running job: no new side effects until `resume` (idempotent); refused (3) for finished jobs."""
    _require("pause")
    out = _call(_ops().pause_job, job_id, _actor(), reason=reason)
    if as_json:
        _print_json(out)
    elif out.get("already_paused"):
        console.print(f"job {job_id} was already paused")
    else:
        console.print(f"job {job_id} paused; its items wait (their retry windows restart on resume). "
                      f"Next: upcfan resume {job_id} | upcfan cancel {job_id}")


@app.command()
def resume(job_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Resume a paused job to the status it was paused from (idempotent); refused (3) for finished jobs."""
    _require("resume")
    out = _call(_ops().resume_job, job_id, _actor())
    if as_json:
        _print_json(out)
    elif out.get("already_running"):
        console.print(f"job {job_id} was not paused ({out.get('status')})")
    else:
        console.print(f"job {job_id} resumed ({out.get('status')}); open items get a fresh retry window")


@app.command("retry-failed")
def retry_failed(
    job_id: str = typer.Argument(...),
    watch: bool = typer.Option(False, "--watch", "-w"),
    interval: float = typer.Option(2.0, "--interval", min=0.1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run only the failed items of a finished job in a new round (bounded; refused with 3 otherwise)."""
    _require("retry-failed")
    out = _call(_ops().retry_failed, job_id, _actor())
    if as_json and not watch:
        _print_json(out)
        return
    verb = "resumed" if out.get("resumed") else "started"
    console.print(f"retry round {out['round']} {verb} for {job_id}: {out.get('items_requeued', 0)} failed items "
                  f"queued, {out.get('tasks_created', 0)} tasks created")
    if watch:
        _finish(watch_job(job_id, interval), as_json)


def _redrive_pages(job_id: str, dry_run: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every page of a re-drive (the core checks a bounded number of open items per call): (rows, answers)."""
    rows: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    cursor = None
    while True:
        out = _call(_ops().redrive_job, job_id, _actor(), dry_run=dry_run, cursor=cursor)
        answers.append(out)
        rows += out.get("items") or []
        cursor = out.get("next_cursor")
        if not cursor:
            return rows, answers


_REDRIVE_COLUMNS = ("gtin", "line", "status", "task_name", "why")


def _redrive_table(title: str, rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> Table:
    table = Table(title=title)
    for col in (*_REDRIVE_COLUMNS, *extra):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in (*_REDRIVE_COLUMNS, *extra)))
    return table


@app.command()
def redrive(
    job_id: str = typer.Argument(...),
    dry_run: bool = typer.Option(False, "--dry-run", help="only list the stranded items; change nothing"),
    yes: bool = typer.Option(False, "--yes", "-y", help="re-drive without asking"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Give each stranded open item of a running or paused job one new task: items `queued`, or `processing`
    with a lapsed lease, whose task no longer exists. Lists them first and asks. Final items are never
    touched; refused (3) for a finished or ingesting job."""
    _require("redrive")
    rows, _ = _redrive_pages(job_id, dry_run=True)
    if as_json and (dry_run or not rows):
        _print_json({"job_id": job_id, "dry_run": True, "items": rows})
        return
    if not as_json:
        console.print(_redrive_table(f"{job_id}: {len(rows)} stranded open item(s)", rows))
    if dry_run or not rows:
        if not as_json:
            console.print("dry run: nothing changed" if rows else "nothing to re-drive: every open item has a "
                                                                   "live task or a live lease")
        return
    if not yes and not typer.confirm(f"Create a new task for each of these {len(rows)} item(s)?", default=False):
        raise _fail(EXIT_ERROR, "re-drive not confirmed; nothing changed")
    done, answers = _redrive_pages(job_id, dry_run=False)
    totals = {k: sum(int(a.get(k) or 0) for a in answers)
              for k in ("tasks_created", "already_enqueued", "moved_meanwhile", "tasks_failed")}
    numbers = [a["redrive"] for a in answers if a.get("redrive")]
    if as_json:
        _print_json({"job_id": job_id, "dry_run": False, "redrive": numbers, **totals, "items": done})
    else:
        console.print(_redrive_table(f"{job_id}: re-drive {', '.join(map(str, numbers)) or '-'}", done,
                                     ("new_task_name", "outcome")))
        console.print(f"re-drive of {job_id}: {totals['tasks_created']} tasks created, {totals['already_enqueued']} "
                      f"already enqueued, {totals['moved_meanwhile']} items moved meanwhile (left alone), "
                      f"{totals['tasks_failed']} failed")
    if totals["tasks_failed"]:
        raise typer.Exit(EXIT_ERROR)


@app.command()
def submit(
    path: str = typer.Argument(..., help="local file (uploaded to UPCFAN_BUCKET) or gs://bucket/object"),
    handler: Optional[str] = typer.Option(
        None, "--handler", help="the handler the job's items run, e.g. dry_run or marketplace_draft "
                                "(default: the object's upcfan-handler metadata, then the configured default)"),
    create_drafts: Optional[bool] = typer.Option(None, "--create-drafts/--no-create-drafts",
                                                 help="deprecated: --handler marketplace_draft"),
    test_mode: Optional[bool] = typer.Option(None, "--test-mode/--no-test-mode", help="deprecated: --handler dry_run"),
    watch: bool = typer.Option(False, "--watch", "-w", help="follow the job until it is final"),
    interval: float = typer.Option(1.0, "--interval", min=0.1),
    wait: float = typer.Option(120.0, "--wait", help="seconds to wait for the upload's job to appear"),
    max_failed_percent: Optional[float] = typer.Option(
        None, "--max-failed-percent", help="pause the job once more than this percent of its items failed "
                                           "(gs:// paths only)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start a job: a local file is uploaded (the bucket's finalize event starts it); gs:// is submitted."""
    handler_options = {"handler": handler, "create_drafts": create_drafts, "test_mode": test_mode}
    _require("submit gs://" if path.startswith("gs://") else "submit FILE")
    if max_failed_percent is not None and not path.startswith("gs://"):
        raise _fail(EXIT_ERROR, "--max-failed-percent is taken with a gs:// path only (an uploaded file's job "
                                "starts from its bucket event, which carries no job options)")
    if path.startswith("gs://"):
        request = _call(_process_request, path, {**handler_options, "max_failed_percent": max_failed_percent})
        result = _call(_ops().submit, request, source="cli")
        job_id = result.job_id
        console.print(f"job {job_id} ({'created' if result.created else 'already existed'}, {result.status}) "
                      f"for {path}")
    else:
        job_id = _upload_and_wait(Path(path), handler_options, wait)
    if watch:
        _finish(watch_job(job_id, interval), as_json)
    if as_json:
        _print_json({"job_id": job_id})


def _process_request(gcs_path: str, handler_options: dict[str, Any]):
    """The same validated request the API takes (gcs_path, handler name, deprecated booleans)."""
    from shared.process_request import ProcessFileRequest

    return ProcessFileRequest(gcs_path=gcs_path, **handler_options)


def _upload_and_wait(path: Path, handler_options: dict[str, Any], wait_s: float) -> str:
    from shared.clients import storage_client
    from shared.config import settings
    from shared.naming import job_id_for

    if not path.is_file():
        raise _fail(EXIT_ERROR, f"{path} is not a file (give a local file or gs://bucket/object)")
    bucket_name = settings().bucket  # required by COMMAND_SETTINGS["submit FILE"]
    # The upload's finalize event starts the job, so the request travels as object metadata.
    request = _call(_process_request, f"gs://{bucket_name}/{path.name}", handler_options)
    metadata = request.handler_choice.as_metadata()
    blob = storage_client().bucket(bucket_name).blob(path.name)
    if metadata:
        blob.metadata = metadata
    _call(blob.upload_from_filename, str(path), content_type="text/plain")
    job_id = job_id_for(bucket_name, path.name, blob.generation)
    console.print(f"uploaded gs://{bucket_name}/{path.name} (generation {blob.generation}); job {job_id}")
    deadline = _monotonic() + wait_s
    while True:
        try:
            view = _ops().get_job_status(job_id)
            console.print(f"job {job_id} is {view.get('status')}")
            return job_id
        except NotFoundError:
            if _monotonic() > deadline:
                raise _fail(EXIT_NOT_FOUND, f"no job {job_id} appeared within {wait_s:.0f}s; is the bucket's "
                                            "finalize trigger running (scripts/dev up)?") from None
            _sleep(0.5)


@app.command()
def sweep(
    as_json: bool = typer.Option(False, "--json"),
    no_alerts: bool = typer.Option(
        False, "--no-alerts", help="flag stalls but post nothing: alerts stay pending for the scheduled sweeper "
                                   "(for when this account cannot read the Slack webhook secret)"),
) -> None:
    """Run one sweep now: flag and alert stalls (it never fixes or re-runs anything) and print the report."""
    from shared.sweeper import run_sweep

    _require("sweep")
    # "" posts nothing and retires nothing: the alerts stay pending for the next sweep with a webhook.
    webhook = "" if no_alerts else _slack_webhook()
    report = _call(run_sweep, webhook_url=webhook)
    data = report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"sweep at {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%SZ}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in data.items():
        if key != "findings":
            table.add_row(key, str(value))
    console.print(table)
    for finding in data.get("findings") or []:
        console.print(finding)


@app.command()
def capacity(
    upcs: int = typer.Option(..., "--upcs", help="UPC lines in the file"),
    shards: int = typer.Option(1, "--shards", help="item queues (UPCFAN_ITEM_QUEUE_SHARDS)"),
    queue_rate: float = typer.Option(500.0, "--queue-rate", help="max_dispatches_per_second per item queue (≤ 500)"),
    queue_concurrent: int = typer.Option(1000, "--queue-concurrent", help="max_concurrent_dispatches per item queue"),
    marketplace_rps: Optional[float] = typer.Option(None, "--marketplace-rps",
                                                    help="marketplace request quota, calls/s (default: none)"),
    marketplace_latency_s: float = typer.Option(0.15, "--marketplace-latency-s", help="one marketplace call's latency"),
    instances: Optional[int] = typer.Option(None, "--instances",
                                            help="worker max instances (default: as deploy sizes it for --shards)"),
    threads: int = typer.Option(80, "--threads", help="worker concurrency (gunicorn THREADS) per instance"),
    worker_rate: float = typer.Option(150.0, "--worker-items-per-s",
                                      help="items/s one worker instance's CPU processes (estimate)"),
    fanout_rate: float = typer.Option(200.0, "--fanout-items-per-s",
                                      help="items/s one ingest instance fans out (estimate)"),
    exemptions: bool = typer.Option(True, "--exemptions/--no-exemptions",
                                    help="item timestamp fields exempt from indexing (else the ~500 writes/s "
                                         "sequential-index cap applies)"),
    ramp: bool = typer.Option(True, "--ramp/--no-ramp",
                              help="apply Firestore's 500/50/5 ramp to the job's new key range"),
    cold_start_s: float = typer.Option(5.0, "--cold-start-s", help="a new worker instance's cold start"),
    count_us: float = typer.Option(2.0, "--count-us-per-item",
                                   help="µs a progress check's counts take per item of the job (estimate)"),
    as_json: bool = typer.Option(False, "--json", help="print the prediction as JSON"),
) -> None:
    """Predict how long a file of --upcs UPCs takes end to end, the limit that binds, and what to lift next."""
    from pydantic import ValidationError

    from shared.capacity import LIMITS, CapacityParams, assess

    given = dict(upcs=upcs, item_queues=shards, queue_dispatches_per_s=queue_rate,
                 queue_max_concurrent=queue_concurrent, marketplace_call_s=marketplace_latency_s,
                 worker_instances=instances, worker_threads=threads, worker_items_per_s_per_instance=worker_rate,
                 fanout_items_per_s_per_instance=fanout_rate, index_exemptions=exemptions, firestore_ramp=ramp,
                 cold_start_s=cold_start_s, progress_count_s_per_item=count_us / 1e6)
    if marketplace_rps is not None:
        given["marketplace_rps"] = marketplace_rps
    try:
        params = CapacityParams(**given)
    except ValidationError as exc:
        flags = {"upcs": "--upcs", "item_queues": "--shards", "queue_dispatches_per_s": "--queue-rate",
                 "queue_max_concurrent": "--queue-concurrent", "marketplace_rps": "--marketplace-rps",
                 "marketplace_call_s": "--marketplace-latency-s", "worker_instances": "--instances",
                 "worker_threads": "--threads", "worker_items_per_s_per_instance": "--worker-items-per-s",
                 "fanout_items_per_s_per_instance": "--fanout-items-per-s", "cold_start_s": "--cold-start-s",
                 "progress_count_s_per_item": "--count-us-per-item"}
        problems = "; ".join(f"{flags.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'options'}: {e['msg']}"
                             for e in exc.errors())
        raise _fail(EXIT_ERROR, f"capacity: {problems}") from None
    report = assess(params)
    data = report.to_dict()
    if as_json:
        _print_json(data)
        return
    p = report.prediction
    table = Table(title=f"{upcs:,} UPCs, {shards} item queue(s): {format_duration(p.total_s)} end to end")
    table.add_column("stage")
    table.add_column("done at", justify="right")
    for name, at in (("plan", p.plan_s), ("fan-out (every item and task made)", p.fanout_done_s),
                     ("last item final", p.work_done_s), ("job completed", p.total_s)):
        table.add_row(name, format_duration(at))
    console.print(table)
    console.print(f"binding limit: [bold]{report.binding}[/] ({LIMITS[report.binding]}); lifting it: "
                  f"{format_duration(report.next_total_s)}"
                  + (f", then [bold]{report.next_limit}[/] binds ({LIMITS[report.next_limit]})"
                     if report.next_limit else ""), highlight=False)
    lifts = Table(title="if one limit were lifted")
    lifts.add_column("limit")
    lifts.add_column("end to end", justify="right")
    lifts.add_column("saved", justify="right")
    for effect in report.effects:
        if effect.saved_s >= 0.5:
            lifts.add_row(effect.limit, format_duration(effect.total_if_lifted_s), format_duration(effect.saved_s))
    if lifts.row_count:
        console.print(lifts)


def _slack_webhook() -> str:
    """The webhook: UPCFAN_SLACK_WEBHOOK_URL (the local stack's stack.env has it), else the secret the profile
    names (UPCFAN_SLACK_WEBHOOK_SECRET), read with Secret Manager's client as the operator; else refuse."""
    from shared.config import settings
    from shared.profiles import SLACK_SECRET_ENV

    url = settings().slack_webhook_url
    if url:
        return url
    secret = os.environ.get(SLACK_SECRET_ENV, "").strip()
    if not secret:
        raise _fail(EXIT_ERROR, f"sweep posts stall alerts, and {_source} has neither UPCFAN_SLACK_WEBHOOK_URL nor "
                                f"{SLACK_SECRET_ENV} (the secret holding it). {_hint}; or run `upcfan sweep "
                                "--no-alerts` to flag stalls and leave their alerts pending for the scheduled sweeper.")
    try:
        return read_secret(secret)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same refusal
        raise _fail(EXIT_ERROR, f"sweep cannot read the Slack webhook from secret {secret}: {type(exc).__name__}: "
                                f"{str(exc)[:300]}. Your account needs roles/secretmanager.secretAccessor on it; or "
                                "run `upcfan sweep --no-alerts` to leave the alerts pending for the scheduled "
                                "sweeper.") from None


@app.command("console")
def console_command(
    job_id: Optional[str] = typer.Argument(None, help="open this job's page instead of the jobs list"),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="local port (default: a free one)"),
    no_browser: bool = typer.Option(False, "--no-browser", help="print the URL only"),
) -> None:
    """Open the web console: serve the private api on http://127.0.0.1:PORT/ through a proxy that adds your
    ID token (the local stack's operator token, or `gcloud auth print-identity-token` with --project or
    --profile), print the URL and open a browser at it. Runs until Ctrl-C."""
    import webbrowser

    from shared.console_view import job_page_url
    from upcfan_cli.console_proxy import ConsoleProxy, GcloudIdentityToken, StaticToken

    api_url = os.environ.get("UPCFAN_API_URL", "")
    if not api_url:
        raise _fail(EXIT_ERROR, f"console needs UPCFAN_API_URL (the api function's URL), which {_source} does not "
                                f"have. {_hint}.")
    local_token = os.environ.get("UPCFAN_OPERATOR_TOKEN", "")
    token = StaticToken(local_token) if local_token else GcloudIdentityToken()
    try:
        proxy = ConsoleProxy(api_url, token, port=port)
    except (OSError, ValueError) as exc:
        raise _fail(EXIT_ERROR, f"console: cannot serve on 127.0.0.1:{port}: {exc}") from None
    url = job_page_url(proxy.url, job_id) if job_id else proxy.url
    who = "the local stack's operator" if local_token else "your gcloud account's ID token"
    # The URL alone on stdout's first line, for scripts (and the browser tests) to read.
    print(url, flush=True)
    err_console.print(f"upcfan console: {api_url} as {who}, on {proxy.url} (Ctrl-C stops it)", highlight=False)
    if not no_browser:
        webbrowser.open(url)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()


def read_secret(secret: str) -> str:
    """The latest version of a Secret Manager secret (projects/P/secrets/ID), with the ambient credentials."""
    from google.cloud import secretmanager

    client = secretmanager.SecretManagerServiceClient()
    response = client.access_secret_version(name=f"{secret}/versions/latest", timeout=30)
    return response.payload.data.decode("utf-8").strip()


def main() -> None:  # pragma: no cover - `python -m upcfan_cli.main`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
