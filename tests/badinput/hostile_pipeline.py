"""An in-memory run of ingest's real planning and chunk classification, for hostile-file tests.

`plan_file` (shared.ingest) and `iter_raw_lines`/`classify_line` (shared.lines) are the production
code; only the object store and the task queue are replaced: `MemoryObject` serves byte ranges
like a generation-pinned GCS object, and the "queue" is a dict of task names, so a GTIN whose task
already exists (created by an earlier chunk) is a duplicate exactly as in `process_chunk`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.exceptions import UnreadableFileError
from shared.ingest import FilePlan, _duplicate_record, plan_file
from shared.lines import FileFormat, classify_line, iter_raw_lines
from shared.naming import task_name_for

JOB_ID = "hostile-000000000000"


@dataclass
class MemoryObject:
    """`GcsObject`-shaped: `.read(start, end)`, `.size`, `.gcs_path`; counts the bytes read."""

    data: bytes
    name: str = "hostile.txt"
    bucket: str = "upcfan-uploads"
    generation: int = 1
    bytes_read: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def gcs_path(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    def read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        out = self.data[start:end]
        self.bytes_read += len(out)
        return out


@dataclass
class Outcome:
    """What ingest would record: a whole-file error, or totals, line records and the tasks created."""

    error: dict | None = None
    plan: FilePlan | None = None
    totals: dict = field(default_factory=lambda: {"lines": 0, "items": 0, "invalid": 0, "duplicate": 0,
                                                   "skipped": 0})
    lines: dict[int, dict] = field(default_factory=dict)  # line -> record (invalid/duplicate only)
    tasks: dict[str, dict] = field(default_factory=dict)  # task name -> payload

    @property
    def code(self) -> str | None:
        return (self.error or {}).get("code")

    def codes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.lines.values():
            out[rec["code"]] = out.get(rec["code"], 0) + 1
        return out


def run_ingest(data: bytes, *, chunk_bytes: int = 256 * 1024, max_lines: int = 2_000_000,
               name: str = "hostile.txt") -> Outcome:
    obj = MemoryObject(data, name=name)
    out = Outcome()
    try:
        plan = plan_file(obj, chunk_bytes, max_lines)
    except UnreadableFileError as exc:
        out.error = exc.to_dict()
        return out
    out.plan = plan
    fmt = FileFormat.from_dict(plan.format.to_dict())  # as stored in and read back from the job doc
    for chunk in plan.chunks:
        _run_chunk(obj, chunk.start, chunk.end, chunk.first_line, fmt, out)
    if out.totals["lines"] == 0:  # `_maybe_finish_fanout` fails such a job
        out.error = {"code": "no_data_lines", "message": f"{obj.gcs_path} has no UPC lines"}
    return out


def _run_chunk(obj: MemoryObject, start: int, end: int, first_line: int, fmt: FileFormat, out: Outcome) -> None:
    """The classification half of `shared.ingest.process_chunk`, with the task queue in memory."""
    first_seen: dict[str, int] = {}
    t = out.totals
    for raw in iter_raw_lines(obj.read, start, end, first_line):
        verdict = classify_line(raw, fmt, strip_bom=(raw.start == 0))
        if verdict.kind == "skip":
            t["skipped"] += 1
            continue
        t["lines"] += 1
        if verdict.kind == "invalid":
            t["invalid"] += 1
            out.lines[raw.line_no] = {"line": raw.line_no, "raw": verdict.upc, "outcome": "invalid",
                                      "code": verdict.code, "reason": verdict.reason}
            continue
        if verdict.gtin in first_seen:
            of = first_seen[verdict.gtin]
        else:
            first_seen[verdict.gtin] = raw.line_no
            name = task_name_for(JOB_ID, verdict.gtin, 1)
            existing = out.tasks.get(name)
            if existing is None:
                out.tasks[name] = {"job_id": JOB_ID, "gtin": verdict.gtin, "upc": verdict.upc,
                                   "line": raw.line_no, "round": 1}
                t["items"] += 1
                continue
            of = existing["line"]
        t["duplicate"] += 1
        out.lines[raw.line_no] = _duplicate_record(raw.line_no, verdict.upc, verdict.gtin, of)
