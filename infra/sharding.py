"""Which item queue shard a task goes to: a pure, stable function of the task name.

Cloud Tasks dispatches at most 500 tasks/s from one queue. 1M UPCs in 10 minutes needs
1,000,000 / 600 s = 1,667 dispatches/s, so ceil(1,667 / 500) = 4 item queues
(`upcfan-items`, `upcfan-items-1`, `upcfan-items-2`, `upcfan-items-3`). See docs/operations.md.

The shard is derived from a SHA-256 of the task name (not Python's salted `hash()`), so every
process -- ingest creating the task, an operator retry creating round N+1, a test -- agrees on
the shard for a name, and names spread evenly because their hash prefix is already uniform.
"""

from __future__ import annotations

import hashlib


def shard_for(task_name: str, shards: int) -> int:
    """Shard index in [0, shards) for a task name; 0 when there is a single queue."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        return 0
    # First 32 bits of the SHA-256, as `shared.tasks.shard_for` (the copy vendored into the
    # functions, which do not ship infra/) computes it; a unit test keeps the two equal.
    digest = hashlib.sha256(task_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % shards


def shard_queue_name(base: str, shard: int) -> str:
    """Queue id of a shard: shard 0 keeps the base name, others get `-{shard}`.

    Matches `shared.config.Settings.item_queue_path(shard)`.
    """
    return base if shard == 0 else f"{base}-{shard}"
