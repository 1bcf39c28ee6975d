"""Deterministic identities: job ids from object generations, Cloud Tasks names from (job, gtin, round)."""

from __future__ import annotations

import hashlib
import re

_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
_STEM_MAX = 40


def _short_hash(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def job_id_for(bucket: str, object_name: str, generation: int | str) -> str:
    """The job for one object generation: a readable stem plus a hash of bucket/object#generation.

    The same finalize event twice, or the HTTP trigger for the same generation, gives the same id;
    a re-upload (new generation) gives a new one.
    """
    base = object_name.rsplit("/", 1)[-1]
    base = base.rsplit(".", 1)[0] if "." in base else base
    stem = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:_STEM_MAX].strip("-") or "file"
    return f"{stem}-{_short_hash(f'{bucket}/{object_name}#{generation}', 12)}"


def task_name_for(job_id: str, gtin: str, round_: int) -> str:
    """Task id for one item in one round; the hash prefix spreads ids as Cloud Tasks advises."""
    name = f"{_short_hash(f'{job_id}:{gtin}:{round_}', 4)}-{job_id}-{gtin}-r{round_}"
    assert _TASK_ID_RE.match(name), name
    return name


# Spreads the index the sweeper's lease-overrun query uses (items CG: status, lease_shard,
# lease_expires_at): claims and heartbeats write lease times near "now + lease", one insertion point
# per shard instead of one for every item in flight (Firestore: ~500 writes/s per sequential range).
LEASE_SHARDS = 16


def lease_shard_for(gtin: str) -> int:
    """An item's lease shard, 0..LEASE_SHARDS-1: fixed per GTIN, spread evenly by a hash."""
    return int(_short_hash(f"lease:{gtin}", 8), 16) % LEASE_SHARDS


def redrive_task_name_for(job_id: str, gtin: str, round_: int, redrive: int) -> str:
    """Task id for an operator's re-drive `redrive` (1, 2, …) of one item in one round: the round's task
    id plus `-d{redrive}`. A new name because the round's own name may be tombstoned (Cloud Tasks keeps a
    deleted or finished task's name for up to an hour); deterministic so that a repeated create of the
    same re-drive answers AlreadyExists instead of enqueuing a second task."""
    if int(redrive) < 1:
        raise ValueError(f"a re-drive number starts at 1, got {redrive!r}")
    name = f"{task_name_for(job_id, gtin, round_)}-d{int(redrive)}"
    assert _TASK_ID_RE.match(name), name
    return name


def chunk_task_name_for(job_id: str, start_byte: int) -> str:
    return f"{_short_hash(f'{job_id}:c{start_byte}', 4)}-{job_id}-c{start_byte}"


def plan_task_name_for(job_id: str) -> str:
    """The one planning task of a job: repeated events and requests for a generation plan it once."""
    return f"{_short_hash(f'{job_id}:plan', 4)}-{job_id}-plan"


def progress_task_name_for(job_id: str, bucket_index: int) -> str:
    """One completion check per job per time bucket: task-name dedup throttles the checks."""
    return f"{_short_hash(f'{job_id}:p{bucket_index}', 4)}-{job_id}-p{bucket_index}"


def results_task_name_for(job_id: str, round_: int) -> str:
    """The one results-manifest task of a job's round."""
    return f"{_short_hash(f'{job_id}:r{round_}', 4)}-{job_id}-results-r{int(round_)}"


def is_valid_task_id(task_id: str) -> bool:
    return bool(_TASK_ID_RE.match(task_id))


def idempotency_key_for(job_id: str, gtin: str) -> str:
    """Key sent to the marketplace: one side effect per (job, gtin), across rounds and deliveries."""
    return f"{job_id}:{gtin}"


def chunk_doc_id(start_byte: int) -> str:
    return f"{start_byte:015d}"


def line_doc_id(line_no: int) -> str:
    return f"{line_no:010d}"
