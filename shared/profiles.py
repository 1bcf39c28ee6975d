"""Deployment profiles: the configuration scripts/deploy deployed, as KEY=value settings for the CLI.

`scripts/deploy --project P` writes `<config dir>/profiles/P.env`; `upcfan --project P` reads it, so
an operator's commands use the deployed queues, URLs and service account instead of empty settings
(issue 14, defect 10). The config dir is UPCFAN_CONFIG_DIR, else $XDG_CONFIG_HOME/upcfan, else
~/.config/upcfan. A profile holds no secret values: the Slack webhook is named by its Secret Manager
secret (UPCFAN_SLACK_WEBHOOK_SECRET), read only by a command that needs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CONFIG_DIR_ENV = "UPCFAN_CONFIG_DIR"
SLACK_SECRET_ENV = "UPCFAN_SLACK_WEBHOOK_SECRET"
# Project ids are 6-30 of [a-z0-9-]; anything else would be a path, not a profile name.
_PROJECT_ID = re.compile(r"[a-z][a-z0-9-]{4,29}")


def config_dir() -> Path:
    explicit = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".config") / "upcfan"


def profile_path(project: str) -> Path:
    if not _PROJECT_ID.fullmatch(project):
        raise ValueError(f"{project!r} is not a Google Cloud project id (6-30 of a-z, 0-9, -)")
    return config_dir() / "profiles" / f"{project}.env"
