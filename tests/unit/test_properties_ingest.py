"""Property tests of ingest planning and classification (hypothesis), on in-memory objects.

- `plan_file` cuts any file, at any chunk size and any read block size, into chunks that
  partition it at line starts, with the right `first_line`, cut at the first line start past
  `chunk_bytes`; reading the chunks yields exactly the lines (and verdicts) of one single pass.
- Fan-out totals obey `lines = items + invalid + duplicate`, items are the unique valid GTINs,
  and neither the chunk size nor the order in which chunks run (chunk tasks race) changes the
  totals or the set of tasks; only which line of a repeated GTIN is "the" item may differ.
- Classification never raises for any line of bytes; an item is always a valid GTIN-14.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from unittest import mock

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from stdnum import ean

import shared.ingest as ingest_mod
import shared.lines as lines_mod
from shared.exceptions import UnreadableFileError
from shared.ingest import plan_file
from shared.lines import FileFormat, classify_line, iter_raw_lines
from shared.naming import task_name_for


@dataclass
class MemObj:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def gcs_path(self) -> str:
        return "gs://bucket/prop.txt"

    def read(self, start: int, end: int) -> bytes:
        return self.data[start:end] if end > start else b""


@contextlib.contextmanager
def block_size(n: int):
    """Shrink the read block so small files still cross many block boundaries."""
    with mock.patch.object(ingest_mod, "BLOCK_BYTES", n), mock.patch.object(lines_mod, "BLOCK_BYTES", n):
        yield


def upc_with_check(body: str) -> str:
    return body + ean.calc_check_digit(body)


VALID = [upc_with_check(f"{i:011d}") for i in range(1, 40)] + ["4006381333931", "96385074", "10036000291459"]

line_values = st.one_of(
    st.sampled_from(VALID),  # valid, and often repeated
    st.sampled_from(VALID).map(lambda v: "0" * (14 - len(v)) + v),  # same GTIN, other spelling
    st.sampled_from(["036000291453", "36000291452", "7.2E+11", "03600029145X", "a,b", "", "   ", "# c",
                     "\u0660\u0663\u0666", "---", "upc", "\t", "\u00e9"]),
    st.text(alphabet="0123456789 -,;\t|#xE.+\r\u00e9", max_size=20),
)
line_ends = st.sampled_from(["\n", "\r\n"])


@st.composite
def text_files(draw, min_lines=0, max_lines=60):
    values = draw(st.lists(line_values, min_size=min_lines, max_size=max_lines))
    ends = draw(st.lists(line_ends, min_size=len(values), max_size=len(values)))
    body = "".join(v + e for v, e in zip(values, ends))
    if values and draw(st.booleans()):
        body = body[: -len(ends[-1])]  # unterminated last line
    prefix = "\ufeff" if draw(st.booleans()) else ""
    return (prefix + body).encode("utf-8")


def single_pass(data: bytes) -> list[tuple[int, int, bytes, int]]:
    return [(r.line_no, r.start, r.data, r.length) for r in iter_raw_lines(MemObj(data).read, 0, len(data), 1)]


# ------------------------------------------------------------------ chunk planning


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_files(min_lines=1), st.integers(1, 300), st.integers(1, 97))
def test_chunks_partition_the_file_at_line_starts(data, chunk_bytes, block):
    assume(data)
    with block_size(block):
        plan = plan_file(MemObj(data), chunk_bytes, 10**6)
        whole = single_pass(data)
        chunks = plan.chunks
        assert chunks[0].start == 0 and chunks[-1].end == len(data)
        for i, c in enumerate(chunks):
            assert c.index == i and c.start < c.end
            assert c.start == 0 or data[c.start - 1:c.start] == b"\n"  # a line start
            assert c.first_line == data[:c.start].count(b"\n") + 1
            if i + 1 < len(chunks):
                assert c.end == chunks[i + 1].start
                # cut at the first line start past start + chunk_bytes, no earlier
                assert c.end - c.start > chunk_bytes
                assert b"\n" not in data[c.start + chunk_bytes:c.end - 1]
        # the last chunk is the remainder: no line start past start + chunk_bytes before the end
        last = chunks[-1]
        assert b"\n" not in data[last.start + chunk_bytes:len(data) - 1]
        assert plan.raw_lines == len(whole)
        union = [(r.line_no, r.start, r.data, r.length)
                 for c in chunks for r in iter_raw_lines(MemObj(data).read, c.start, c.end, c.first_line)]
        assert union == whole


@settings(max_examples=150, deadline=None)
@given(text_files(min_lines=1), st.integers(1, 200), st.integers(1, 64))
def test_chunked_verdicts_equal_single_pass_verdicts(data, chunk_bytes, block):
    assume(data)
    with block_size(block):
        plan = plan_file(MemObj(data), chunk_bytes, 10**6)
        fmt = plan.format
        one = [classify_line(r, fmt, strip_bom=(r.start == 0)) for r in iter_raw_lines(MemObj(data).read, 0,
                                                                                     len(data), 1)]
        many = [classify_line(r, fmt, strip_bom=(r.start == 0))
                for c in plan.chunks for r in iter_raw_lines(MemObj(data).read, c.start, c.end, c.first_line)]
        assert many == one


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 400), st.integers(1, 64), st.integers(0, 50))
def test_plan_is_independent_of_the_read_block_size(chunk_bytes, block, seed):
    rng = random.Random(seed)
    data = "".join(rng.choice(VALID) + rng.choice(["\n", "\r\n"]) for _ in range(rng.randint(1, 80))).encode()
    with block_size(block):
        small = plan_file(MemObj(data), chunk_bytes, 10**6)
    big = plan_file(MemObj(data), chunk_bytes, 10**6)
    assert small == big


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 120), st.integers(0, 3))
def test_max_lines_counts_newlines_exactly(n_lines, slack):
    data = ("036000291452\n" * n_lines).encode() or b"x"
    limit = max(0, n_lines - 1 + slack)
    try:
        plan = plan_file(MemObj(data), 64, limit)
    except UnreadableFileError as exc:
        assert exc.code == "too_many_lines" and n_lines > limit
    else:
        assert data.count(b"\n") <= limit and plan.raw_lines == max(1, n_lines)


# ------------------------------------------------------------------ fan-out totals


def fan_out(data: bytes, chunk_bytes: int, order_seed: int | None = None) -> tuple[dict, dict, dict]:
    """Totals, tasks and line records of a fan-out, running chunks in a random order if seeded.

    Mirrors `shared.ingest.process_chunk`: duplicates within a chunk by first sight, across
    chunks by an existing item (whoever created it first owns the GTIN; `tasks` stands for the
    items born with their tasks)."""
    obj = MemObj(data)
    plan = plan_file(obj, chunk_bytes, 10**6)
    fmt = FileFormat.from_dict(plan.format.to_dict())
    chunks = list(plan.chunks)
    if order_seed is not None:
        random.Random(order_seed).shuffle(chunks)
    totals = {"lines": 0, "items": 0, "invalid": 0, "duplicate": 0, "skipped": 0}
    tasks: dict[str, dict] = {}
    records: dict[int, dict] = {}
    for c in chunks:
        first_seen: dict[str, int] = {}
        for raw in iter_raw_lines(obj.read, c.start, c.end, c.first_line):
            v = classify_line(raw, fmt, strip_bom=(raw.start == 0))
            if v.kind == "skip":
                totals["skipped"] += 1
                continue
            totals["lines"] += 1
            if v.kind == "invalid":
                totals["invalid"] += 1
                records[raw.line_no] = {"outcome": "invalid", "code": v.code}
                continue
            name = task_name_for("job-prop", v.gtin, 1)
            if v.gtin in first_seen or name in tasks:
                totals["duplicate"] += 1
                records[raw.line_no] = {"outcome": "duplicate", "gtin": v.gtin}
                continue
            first_seen[v.gtin] = raw.line_no
            tasks[name] = {"gtin": v.gtin, "line": raw.line_no}
            totals["items"] += 1
    return totals, tasks, records


@settings(max_examples=200, deadline=None)
@given(text_files(), st.integers(1, 200), st.integers(0, 10**6))
def test_totals_invariant_and_independent_of_chunking_and_chunk_order(data, chunk_bytes, seed):
    assume(data)
    totals, tasks, records = fan_out(data, 10**6)  # one chunk: the reference
    assert totals["lines"] == totals["items"] + totals["invalid"] + totals["duplicate"]
    assert totals["lines"] + totals["skipped"] == len(single_pass(data))
    gtins = [t["gtin"] for t in tasks.values()]
    assert len(gtins) == len(set(gtins)) == totals["items"]
    assert all(g.isascii() and g.isdigit() and len(g) == 14 and ean.is_valid(g) for g in gtins)
    for other in (fan_out(data, chunk_bytes), fan_out(data, chunk_bytes, order_seed=seed)):
        o_totals, o_tasks, o_records = other
        assert o_totals == totals
        assert {t["gtin"] for t in o_tasks.values()} == set(gtins)
        # every line is accounted for once: an item's line, or a record, or skipped
        item_lines = {t["line"] for t in o_tasks.values()}
        assert not item_lines & set(o_records)
        assert len(item_lines) + len(o_records) == o_totals["lines"]
        # invalid lines are the same lines whatever the chunking
        assert {n for n, r in o_records.items() if r["outcome"] == "invalid"} == \
               {n for n, r in records.items() if r["outcome"] == "invalid"}


# ------------------------------------------------------------------ classification never raises


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), st.booleans(),
       st.sampled_from([",", ";", "\t", "|"]), st.integers(0, 3), st.integers(0, 3))
def test_classify_line_never_raises_and_items_are_valid_gtins(data, bom, delim, column, header_line):
    raw_bytes = (b"\xef\xbb\xbf" if bom else b"") + data
    raw = next(iter_raw_lines(MemObj(raw_bytes + b"\n").read, 0, len(raw_bytes) + 1, 1))
    for fmt in (FileFormat("lines"), FileFormat("csv", delim, column, header_line)):
        v = classify_line(raw, fmt, strip_bom=True)
        assert v.kind in ("skip", "invalid", "item")
        if v.kind == "item":
            assert v.gtin.isascii() and len(v.gtin) == 14 and ean.is_valid(v.gtin)
        if v.kind == "invalid":
            assert v.code and v.reason and len(v.upc) <= 81


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_classify_any_text_line_never_raises(text):
    data = text.replace("\n", " ").encode("utf-8")
    raw = next(iter_raw_lines(MemObj(data + b"\n").read, 0, len(data) + 1, 1))
    v = classify_line(raw, FileFormat("lines"), strip_bom=False)
    assert v.kind in ("skip", "invalid", "item")
