"""Where the local stack keeps its files: everything lives under <repo>/.local."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("UPCFAN_LOCAL_DIR", REPO_ROOT / ".local"))
RUN_DIR = LOCAL / "run"
LOG_DIR = LOCAL / "logs"
NODE_DIR = LOCAL / "node"  # firebase-tools installed here by scripts/bootstrap (npm ci)
STACK_ENV = LOCAL / "stack.env"
STATE_FILE = RUN_DIR / "stack.json"
DELIVERIES_FILE = RUN_DIR / "bridge-deliveries.jsonl"
NODE_SPEC_DIR = REPO_ROOT / "devstack" / "node"
FIREBASE_BIN = NODE_DIR / "node_modules" / ".bin" / "firebase"


def log_path(component: str) -> Path:
    return LOG_DIR / f"{component}.log"


def pid_path(component: str) -> Path:
    return RUN_DIR / f"{component}.pid"
