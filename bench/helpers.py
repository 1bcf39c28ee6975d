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
