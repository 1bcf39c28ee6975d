"""How a bench starts and stops its helper processes, so that it leaves nothing behind.

Each helper (an emulator, a target server) runs in its own session, so its process group is its own:
a Ctrl-C on the terminal reaches the bench alone, which then stops its helpers in order, and stopping a
helper ends every process of its group (the java under a wrapper, a server's workers). A SIGTERM to
a bench is turned into KeyboardInterrupt, so the same `finally` / ExitStack cleanup runs for it too.
bench/runner.py checks afterwards that nothing a bench started outlived it.
"""

from __future__ import annotations

import os
import signal
import subprocess

QUICK_HELP = "a few seconds at tiny sizes: proves the bench runs and reports; no figure means anything"


def start_group(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen in a new session (its own process group), stopped by stop_group."""
    return subprocess.Popen(argv, start_new_session=True, **popen_kwargs)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the helper's whole group, SIGKILL the group after `grace_s`; reaps; never raises."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)  # what is left of the group (the leader may be gone already)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def interrupt_on_sigterm() -> None:
    """A SIGTERM (bench/run's time limit, a test's teardown) runs the bench's cleanup like Ctrl-C does."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


# The emulator takes deletes as fast as they come; the client's default BulkWriter paces them at 500/s
# (production's ramp for a new key range), which would make tidying a 100k-item job take minutes.
_CLEANUP_DELETES_PER_S = 20_000


def delete_jobs(job_ids) -> int:
    """Delete each job's document and everything under it (items, chunks, line records, events) from
    the stack's Firestore; returns how many documents went. A bench leaves nothing behind: the
    emulator's count aggregation scans every document it stores, so a 100k-item job left by one bench
    slowed every later job's progress checks (and the next bench's figures) by seconds."""
    from google.cloud.firestore_v1.bulk_writer import BulkWriterOptions

    from shared.clients import firestore_client
    from shared.model import JOBS

    db = firestore_client()
    deleted = 0
    for job_id in job_ids:
        writer = db.bulk_writer(options=BulkWriterOptions(initial_ops_per_second=_CLEANUP_DELETES_PER_S,
                                                          max_ops_per_second=_CLEANUP_DELETES_PER_S))
        deleted += db.recursive_delete(db.collection(JOBS).document(job_id), bulk_writer=writer)
    return deleted


def wipe_emulator_project(host: str, project: str) -> None:
    """Drop every document of `project` from the Firestore emulator at `host` (its own reset endpoint),
    for a bench that seeded a project of its own on a shared emulator."""
    import urllib.request

    request = urllib.request.Request(f"http://{host}/emulator/v1/projects/{project}/databases/(default)/documents",
                                     method="DELETE")
    with urllib.request.urlopen(request, timeout=60):
        pass
