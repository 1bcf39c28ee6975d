"""Where the local stack keeps its files: everything lives under <repo>/.local."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("UPCFAN_LOCAL_DIR", REPO_ROOT / ".local"))
RUN_DIR = LOCAL / "run"
LOG_DIR = LOCAL / "logs"
# Installed tools stay in the checkout's .local even when a stack runs from another UPCFAN_LOCAL_DIR.
NODE_DIR = REPO_ROOT / ".local" / "node"  # firebase-tools, installed by scripts/bootstrap (npm ci)
STACK_ENV = LOCAL / "stack.env"
SECRETS_ENV = LOCAL / "secrets.env"  # this run's secrets (mode 0600, never printed); not in stack.env
STATE_FILE = RUN_DIR / "stack.json"
LOCK_FILE = LOCAL / "stack.lock"
USERS_DIR = LOCAL / "users"  # test sessions using a stack they may not have started
DELIVERIES_FILE = RUN_DIR / "bridge-deliveries.jsonl"
NODE_SPEC_DIR = REPO_ROOT / "devstack" / "node"
FIREBASE_BIN = NODE_DIR / "node_modules" / ".bin" / "firebase"


def log_path(component: str) -> Path:
    return LOG_DIR / f"{component}.log"


def pid_path(component: str) -> Path:
    return RUN_DIR / f"{component}.pid"
