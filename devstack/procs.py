"""Background processes of the local stack: start in own process groups, find, and stop without leftovers."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from devstack import paths

# Every process of a stack (and every child it spawns, e.g. the java under firebase-tools) carries
# this variable, so `down` finds strays even when their parent died first.
TAG_VAR = "UPCFAN_DEVSTACK_ID"


def stack_tag() -> str:
    return str(paths.LOCAL.resolve())


class StackError(RuntimeError):
    """The stack could not start or stop; the message names the component and its log."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A free port *below* the kernel's ephemeral range: a port from bind(0) can be taken by any
    outgoing connection's local end before the component binds it (seen on a busy machine)."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, min(low, 32768)))
        if port_is_free(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def who_listens(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return describe_process(psutil.Process(conn.pid))
    except (psutil.Error, OSError):
        pass
    return "another process"


def describe_process(proc: psutil.Process) -> str:
    """'pid N (its command line)', for messages that name a process."""
    try:
        return f"pid {proc.pid} ({' '.join(proc.cmdline())[:120]})"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str, timeout: float = 1.0) -> bool:
    status = http_status(url, timeout)
    return status is not None and 200 <= status < 300


def http_answers(url: str, timeout: float = 1.0) -> bool:
    return http_status(url, timeout) is not None


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])


@dataclass
class Component:
    """One background process of the stack and how to tell it is ready."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = paths.REPO_ROOT
    after: tuple[str, ...] = ()  # components that must be ready (and set up) first
    setup: Callable[[], None] | None = None  # runs once the component is ready
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_at: float = 0.0

    @property
    def log(self) -> Path:
        return paths.log_path(self.name)

    def start(self, base_env: dict[str, str]) -> None:
        paths.LOG_DIR.mkdir(parents=True, exist_ok=True)
        paths.RUN_DIR.mkdir(parents=True, exist_ok=True)
        env = dict(base_env)
        env.update(self.env)
        env[TAG_VAR] = stack_tag()
        with self.log.open("ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            logf.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.cwd),
                    env=env,
                    start_new_session=True,  # own process group: `down` kills the whole group
                )
            except OSError as exc:
                raise StackError(f"{self.name}: cannot start {self.argv[0]}: {exc} (log: {self.log})") from exc
        self.started_at = time.monotonic()
        record_pid(self.name, self.proc.pid, self.argv)

    def failure(self, why: str) -> StackError:
        return StackError(
            f"{self.name} {why}\n  log: {self.log}\n  --- last lines of {self.log.name} ---\n"
            + "\n".join("  " + line for line in log_tail(self.log).splitlines())
        )


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM a child, SIGKILL it if it is still there after `grace_s`; always reaped, never raises."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def record_pid(name: str, pid: int, argv: list[str]) -> None:
    try:
        ctime = psutil.Process(pid).create_time()
    except psutil.Error:
        ctime = 0.0
    info = {"pid": pid, "pgid": pid, "create_time": ctime, "argv": argv, "children": []}
    paths.pid_path(name).write_text(json.dumps(info))


def record_children(name: str) -> None:
    """Remember descendants (firebase-tools runs java in its own group) so `down` can end them."""
    p = paths.pid_path(name)
    try:
        info = json.loads(p.read_text())
        kids = psutil.Process(info["pid"]).children(recursive=True)
        info["children"] = [{"pid": k.pid, "create_time": k.create_time()} for k in kids]
        p.write_text(json.dumps(info))
    except (OSError, ValueError, KeyError, psutil.Error):
        pass


def read_pids() -> dict[str, dict]:
    out = {}
    if not paths.RUN_DIR.exists():
        return out
    for p in sorted(paths.RUN_DIR.glob("*.pid")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return out


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if create_time and abs(proc.create_time() - create_time) > 1.0:
            return None  # the pid was reused by someone else
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def alive(info: dict) -> bool:
    return _same_process(info["pid"], info.get("create_time", 0.0)) is not None


def tagged_processes() -> list[psutil.Process]:
    """Processes of this checkout's stack, found by the environment tag (children included)."""
    return processes_with_env(TAG_VAR, stack_tag())


def processes_with_env(var: str, value: str) -> list[psutil.Process]:
    """Live processes (other than this one) whose environment holds var=value: what a tool started,
    including children whose parent died."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(var) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def end_processes(procs: list[psutil.Process], grace_s: float = 8.0) -> None:
    """SIGTERM each; SIGKILL (with its whole group when it leads one) whatever is left after `grace_s`."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, remaining = psutil.wait_procs(procs, timeout=grace_s)
    for proc in remaining:
        try:
            os.killpg(proc.pid, signal.SIGKILL) if os.getpgid(proc.pid) == proc.pid else None
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(remaining, timeout=3.0)


def stop_all(grace_s: float = 8.0) -> list[str]:
    """End every process of the stack: recorded groups, their descendants, tagged strays. Returns names."""
    victims: dict[int, psutil.Process] = {}
    groups: set[int] = set()
    names = []
    for name, info in read_pids().items():
        root = _same_process(info["pid"], info.get("create_time", 0.0))
        if root is not None:
            names.append(name)
            victims[root.pid] = root
            groups.add(info.get("pgid", info["pid"]))
            try:
                for kid in root.children(recursive=True):
                    victims[kid.pid] = kid
            except psutil.Error:
                pass
        for kid in info.get("children", []):
            proc = _same_process(kid["pid"], kid.get("create_time", 0.0))
            if proc is not None:
                victims[proc.pid] = proc
    for proc in tagged_processes():
        victims.setdefault(proc.pid, proc)
    for pgid in groups:
        try:
            if os.getpgid(pgid) == pgid:
                os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    end_processes(list(victims.values()), grace_s)
    for pid_file in paths.RUN_DIR.glob("*.pid") if paths.RUN_DIR.exists() else []:
        pid_file.unlink(missing_ok=True)
    return names


def run_local_server(app, name: str, host: str, port: int, **kwargs) -> None:
    """Serve an aiohttp app of the local stack until stopped; its "ready" line is what the stack waits for."""
    from aiohttp import web

    web.run_app(app, host=host, port=port, access_log=None,
                print=lambda _msg: print(f"{name} ready on http://{host}:{port}", flush=True), **kwargs)
