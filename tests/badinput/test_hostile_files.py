"""Hostile files through ingest's real planning and chunk classification (docs/input-formats.md).

Each test names the documented outcome: a whole-file error code (the job ends `failed`, nothing is
enqueued) or exact totals and per-line codes. Every run also checks the two things that must hold
for *any* input: ingest never crashes (only `UnreadableFileError` leaves `plan_file`), and it
never enqueues garbage (each task is one valid GTIN-14, one per unique GTIN, and
`items + invalid + duplicate = lines`).
"""

from __future__ import annotations

import gzip
import io
import zipfile

import pytest
from stdnum import ean

from hostile_pipeline import Outcome, run_ingest

UPC = "036000291452"  # UPC-A, GTIN-14 00036000291452
EAN13 = "4006381333931"
EAN8 = "96385074"
GTIN14 = "10036000291459"


def _valid(code: str) -> bool:
    return code.isascii() and code.isdigit() and len(code) == 14 and ean.is_valid(code)


def check_invariants(out: Outcome) -> Outcome:
    """Never garbage: tasks are valid, unique GTIN-14s; every data line is counted exactly once."""
    if out.error and out.code != "no_data_lines":
        assert not out.tasks, "a refused file enqueued tasks"
        assert out.error["message"], "whole-file errors carry a reason"
        return out
    t = out.totals
    assert t["lines"] == t["items"] + t["invalid"] + t["duplicate"]
    assert t["items"] == len(out.tasks)
    gtins = [p["gtin"] for p in out.tasks.values()]
    assert len(set(gtins)) == len(gtins)
    assert all(_valid(g) for g in gtins), [g for g in gtins if not _valid(g)][:5]
    assert len(out.lines) == t["invalid"] + t["duplicate"]
    for rec in out.lines.values():
        assert rec["code"] and (rec.get("reason") or rec["outcome"] == "duplicate")
        assert len(rec["raw"]) <= 81  # clipped to 80 chars plus the ellipsis
    task_lines = {p["line"] for p in out.tasks.values()}
    assert not task_lines & set(out.lines), "a line is both an item and invalid/duplicate"
    return out


def ingest(data: bytes, **kw) -> Outcome:
    return check_invariants(run_ingest(data, **kw))


# ------------------------------------------------------------------ whole-file outcomes


def test_empty_file_is_refused_as_empty_file():
    out = ingest(b"")
    assert out.code == "empty_file" and "0 bytes" in out.error["message"]


@pytest.mark.parametrize("data", [b" ", b"\n\n\n", b" \t \r\n\t\n   \n", b"\r\n" * 1000])
def test_only_whitespace_has_no_data_lines(data):
    out = ingest(data)
    assert out.code == "no_data_lines"
    assert out.totals["lines"] == 0 and not out.tasks


def test_only_comments_has_no_data_lines():
    out = ingest(b"# exported 2025-08-23\n#036000291452\n   # indented comment\n\n")
    assert out.code == "no_data_lines"
    assert out.totals == {"lines": 0, "items": 0, "invalid": 0, "duplicate": 0, "skipped": 4}


def test_binary_file_is_refused_naming_the_nul_offset():
    out = ingest(b"036000291452\n\x00\x01\x02\xff" + bytes(range(256)))
    assert out.code == "binary_file" and "offset 13" in out.error["message"]


def test_nul_far_into_the_file_is_still_binary():
    # detect_binary sees only the first block; the UTF-8 pass must catch a NUL anywhere.
    data = (UPC + "\n").encode() * 50_000 + b"\x00" + (UPC + "\n").encode()
    out = ingest(data)
    assert out.code == "binary_file" and f"offset {13 * 50_000}" in out.error["message"]


def test_gzip_is_refused_as_compressed():
    out = ingest(gzip.compress((UPC + "\n").encode() * 100))
    assert out.code == "compressed_file" and "gzip" in out.error["message"]


@pytest.mark.parametrize("member", ["upcs.txt", "xl/worksheets/sheet1.xml"])
def test_zip_and_xlsx_are_refused_as_compressed(member):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, UPC + "\n")
    out = ingest(buf.getvalue())
    assert out.code == "compressed_file" and "xlsx" in out.error["message"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_with_bom_is_refused_as_utf16(encoding):
    text = f"{UPC}\n{EAN13}\n"
    data = text.encode(encoding) if encoding == "utf-16" else b"\xfe\xff" + text.encode("utf-16-be")
    out = ingest(data)
    assert out.code == "utf16_file" and "UTF-8" in out.error["message"]


def test_utf16_le_without_bom_is_binary():
    # No BOM to recognise, but ASCII in UTF-16 is every other byte NUL: "a NUL byte anywhere".
    out = ingest(f"{UPC}\n{EAN13}\n".encode("utf-16-le"))
    assert out.code == "binary_file"


def test_latin1_bytes_are_refused_as_not_utf8_with_offset_and_byte():
    data = f"{UPC}\nCaf\xe9 {EAN13}\n".encode("latin-1")
    out = ingest(data)
    assert out.code == "not_utf8"
    assert "0xe9" in out.error["message"] and "offset 16" in out.error["message"]


def test_too_many_lines_is_refused_before_anything_is_enqueued():
    data = "".join(f"{UPC}\n" for _ in range(1001)).encode()
    out = ingest(data, max_lines=1000)
    assert out.code == "too_many_lines" and "1,000" in out.error["message"]


# ------------------------------------------------------------------ encodings and line endings


def test_utf8_bom_is_stripped_from_the_first_line():
    out = ingest(b"\xef\xbb\xbf" + f"{UPC}\n{EAN13}\n".encode())
    assert out.error is None and out.totals["items"] == 2 and out.totals["invalid"] == 0
    assert {p["gtin"] for p in out.tasks.values()} == {"00036000291452", "04006381333931"}


def test_crlf_line_endings_are_accepted():
    out = ingest(f"{UPC}\r\n{EAN13}\r\n{EAN8}\r\n{GTIN14}\r\n".encode())
    assert out.totals == {"lines": 4, "items": 4, "invalid": 0, "duplicate": 0, "skipped": 0}


def test_mixed_line_endings_lf_crlf_and_bare_cr():
    out = ingest(f"{UPC}\n{EAN13}\r\n{EAN8}\r{GTIN14}\n".encode())
    assert out.totals["items"] == 2 and out.totals["invalid"] == 1
    assert out.lines[3]["code"] == "bare_carriage_return"


def test_old_mac_file_is_one_bare_carriage_return_line():
    out = ingest(f"{UPC}\r{EAN13}\r{EAN8}\r".encode())
    assert out.totals["lines"] == 1 and out.lines[1]["code"] == "bare_carriage_return"
    assert "LF or CRLF" in out.lines[1]["reason"]


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_mixed_separators_on_a_plain_line_are_multiple_fields(sep):
    out = ingest(f"{UPC}\n{EAN13}{sep}{EAN8}\n{GTIN14}\n".encode())
    assert out.totals == {"lines": 3, "items": 2, "invalid": 1, "duplicate": 0, "skipped": 0}
    assert out.lines[2]["code"] == "multiple_fields" and repr(sep) in out.lines[2]["reason"]


def test_trailing_whitespace_and_tabs_are_trimmed():
    out = ingest(f"  {UPC} \t\n\t{EAN13}\t\t\n{EAN8}   \r\n\u00a0{GTIN14}\u00a0\n".encode())
    assert out.totals == {"lines": 4, "items": 4, "invalid": 0, "duplicate": 0, "skipped": 0}


def test_spaces_and_hyphens_inside_a_code_are_ignored_and_dedupe():
    out = ingest(f"0-36000-29145-2\n0 36000 29145 2\n{UPC}\n00{UPC[:-1]}9\n".encode())
    assert out.totals["items"] == 1 and out.totals["duplicate"] == 2
    assert out.lines[2]["duplicate_of_line"] == 1 and out.lines[3]["duplicate_of_line"] == 1
    assert out.lines[4]["code"] == "bad_check_digit"


# ------------------------------------------------------------------ hostile lines


def test_5mb_single_line_is_line_too_long_and_read_in_blocks():
    data = b"7" * (5 * 1024 * 1024)
    out = ingest(data)
    assert out.totals == {"lines": 1, "items": 0, "invalid": 1, "duplicate": 0, "skipped": 0}
    rec = out.lines[1]
    assert rec["code"] == "line_too_long" and "5,242,880 bytes" in rec["reason"]
    assert len(rec["raw"]) <= 81


def test_5mb_line_between_good_lines_with_small_chunks():
    data = f"{UPC}\n".encode() + b"1," * (5 * 1024 * 1024 // 2) + f"\n{EAN13}\n".encode()
    out = ingest(data, chunk_bytes=64 * 1024)
    assert out.totals == {"lines": 3, "items": 2, "invalid": 1, "duplicate": 0, "skipped": 0}
    assert out.lines[2]["code"] == "line_too_long"
    assert len(out.plan.chunks) == 2  # no chunk can start inside the long line


def test_gtin14_with_bad_check_digit():
    out = ingest(b"10036000291458\n")
    rec = out.lines[1]
    assert rec["code"] == "bad_check_digit"
    assert rec["reason"] == "GTIN-14 '10036000291458' has check digit 8, expected 9"


def test_upc_a_with_bad_check_digit_names_the_expected_digit():
    out = ingest(b"036000291453\n")
    assert out.lines[1]["reason"] == "UPC-A '036000291453' has check digit 3, expected 2"


def test_eleven_digits_lost_leading_zero():
    out = ingest(b"36000291452\n")
    rec = out.lines[1]
    assert rec["code"] == "bad_length" and "11 digits" in rec["reason"] and "leading zero" in rec["reason"]


@pytest.mark.parametrize("value", ["7.2E+11", "7.20E+11", "3.6e+10", "7E11"])
def test_scientific_notation(value):
    out = ingest(f"{value}\n{UPC}\n".encode())
    assert out.lines[1]["code"] == "scientific_notation" and "export the column as text" in out.lines[1]["reason"]
    assert out.totals["items"] == 1


def test_duplicates_are_processed_once_and_name_the_first_line():
    data = f"{UPC}\n{EAN13}\n{UPC}\n00{UPC}\n{EAN13}\n".encode()
    out = ingest(data)
    assert out.totals == {"lines": 5, "items": 2, "invalid": 0, "duplicate": 3, "skipped": 0}
    assert [out.lines[n]["duplicate_of_line"] for n in (3, 4, 5)] == [1, 1, 2]
    assert out.lines[4]["reason"] == "GTIN 00036000291452 already appears on line 1"


def test_duplicates_across_chunks_are_caught_by_task_name():
    filler = "".join(f"{b}{ean.calc_check_digit(b)}\n" for b in (f"{i:011d}" for i in range(1, 2000)))
    data = f"{UPC}\n{filler}{UPC}\n".encode()
    out = ingest(data, chunk_bytes=4096)
    assert len(out.plan.chunks) > 5
    assert out.totals["duplicate"] == 1 and out.lines[2001]["duplicate_of_line"] == 1


@pytest.mark.parametrize("value", [
    "\u0660\u0663\u0666\u0660\u0660\u0660\u0662\u0669\u0661\u0664\u0665\u0662",  # Arabic-Indic digits
    "\uff10\uff13\uff16\uff10\uff10\uff10\uff12\uff19\uff11\uff14\uff15\uff12",  # full-width digits
    "03600029145\u00b2",  # superscript two: str.isdigit() is True for it
    "\u0966\u0969\u096c\u0966\u0966\u0966\u0968\u096f\u0967\u096a\u096b\u0968",  # Devanagari digits
])
def test_non_ascii_digits_are_not_digits(value):
    out = ingest(f"{value}\n{UPC}\n".encode())
    assert out.lines[1]["code"] == "not_digits" and "non-ASCII" in out.lines[1]["reason"]
    assert out.totals["items"] == 1


def test_letters_and_zero_width_characters_are_not_digits():
    out = ingest(f"03600029145X\n\u200b{UPC}\n".encode())
    assert [out.lines[n]["code"] for n in (1, 2)] == ["not_digits", "not_digits"]
    assert "'X'" in out.lines[1]["reason"]


# ------------------------------------------------------------------ CSV


def test_csv_with_upc_column_and_quoted_fields():
    data = (
        'sku,"Product title",UPC,price\n'
        f'A1,"Widget, large",{UPC},1.00\n'
        f'A2,"He said ""hi""","{EAN13}",2.00\n'
        f'A3,"short row"\n'
        f'A4,"bad",036000291453,3.00\n'
        f'A5,"dup","{UPC}",4.00\n'
    ).encode()
    out = ingest(data)
    assert out.plan.format.kind == "csv" and out.plan.format.column == 2 and out.plan.format.header_line == 1
    assert out.totals == {"lines": 5, "items": 2, "invalid": 2, "duplicate": 1, "skipped": 1}
    assert out.lines[4]["code"] == "missing_column" and out.lines[5]["code"] == "bad_check_digit"
    assert out.lines[6]["duplicate_of_line"] == 2


@pytest.mark.parametrize("delim", [";", "\t", "|"])
def test_csv_other_delimiters_with_bom_and_crlf(delim):
    rows = [f"gtin{delim}title", f"{UPC}{delim}a", f"{EAN13}{delim}b"]
    out = ingest(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    assert out.plan.format.kind == "csv" and out.plan.format.delimiter == delim
    assert out.totals == {"lines": 2, "items": 2, "invalid": 0, "duplicate": 0, "skipped": 1}


def test_csv_without_a_upc_column_is_read_as_plain_lines():
    # No header names upc/gtin/ean/barcode: it is a plain file and every row has several fields.
    out = ingest(f"sku,price\nA1,{UPC}\nA2,{EAN13}\n".encode())
    assert out.plan.format.kind == "lines"
    assert out.totals == {"lines": 3, "items": 0, "invalid": 3, "duplicate": 0, "skipped": 0}
    assert set(out.codes()) == {"multiple_fields"} and "'upc' header" in out.lines[1]["reason"]


def test_csv_header_after_comments_and_blank_lines():
    out = ingest(f"# export\n\nBarcode,Name\n{UPC},x\n".encode())
    assert out.plan.format.header_line == 3 and out.totals["items"] == 1 and out.totals["skipped"] == 3


# ------------------------------------------------------------------ big files


def _unique_upcs(n: int) -> bytes:
    """n distinct valid UPC-As, fast: the check digit sum is split into high and low digit parts."""
    def weights(digits: str, offset: int) -> int:
        # Body position p (0-based from the left, 11 digits) has weight 3 when p is even.
        return sum(int(d) * (3 if (offset + p) % 2 == 0 else 1) for p, d in enumerate(digits))

    hi_sum = {h: weights(f"{h:08d}", 0) for h in range(n // 1000 + 1)}
    lo_sum = {lo: weights(f"{lo:03d}", 8) for lo in range(1000)}
    return "".join(
        f"{i:011d}{(10 - (hi_sum[i // 1000] + lo_sum[i % 1000]) % 10) % 10}\n" for i in range(n)
    ).encode()


def test_unique_upc_generator_is_valid():
    data = _unique_upcs(3000).decode().split()
    assert all(ean.is_valid(u) for u in data[:3000:7]) and len(set(data)) == 3000


def test_one_million_lines_plan_and_sampled_fan_out():
    n = 1_000_000
    data = _unique_upcs(n)
    from hostile_pipeline import MemoryObject, _run_chunk
    from shared.ingest import plan_file
    from shared.lines import FileFormat

    obj = MemoryObject(data)
    plan = plan_file(obj, 64 * 1024, 2_000_000)
    assert plan.raw_lines == n and plan.format.kind == "lines"
    assert plan.chunks[0].start == 0 and plan.chunks[-1].end == len(data)
    lines_per_chunk = []
    for a, b in zip(plan.chunks, plan.chunks[1:]):
        assert a.end == b.start and data[b.start - 1:b.start] == b"\n"
        lines_per_chunk.append(b.first_line - a.first_line)
    assert sum(lines_per_chunk) + (n + 1 - plan.chunks[-1].first_line) == n
    assert len(plan.chunks) == len(data) // (64 * 1024) + 1
    # Bounded memory: planning reads the file once (plus the sniffed first block and the last byte).
    assert obj.bytes_read <= len(data) + 256 * 1024 + 1
    # Fan out the first, a middle and the last chunk with the real classifier: every line an item.
    out = Outcome(plan=plan)
    for chunk in (plan.chunks[0], plan.chunks[len(plan.chunks) // 2], plan.chunks[-1]):
        _run_chunk(obj, chunk.start, chunk.end, chunk.first_line, FileFormat("lines"), out)
    assert out.totals["items"] == out.totals["lines"] == len(out.tasks) > 0 and not out.lines
    assert max(p["line"] for p in out.tasks.values()) == n
    # One more line than allowed is refused by the same pass.
    with pytest.raises(Exception) as err:
        plan_file(obj, 64 * 1024, n - 1)
    assert getattr(err.value, "code", "") == "too_many_lines"


# ------------------------------------------------------------------ never crashes


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbf",  # only a BOM
    b"\xef\xbb\xbf\n",
    b"\r",
    b"#",
    b"\n" * 3 + b"\xef\xbb\xbf" + UPC.encode(),  # a BOM that is not at the start of the file
    b'upc\n"036000291452\n',  # unterminated quote in a one-column file
    b'upc,x\n"036000291452,y\n',  # unterminated quote in a CSV row
    b"upc,upc\n036000291452,4006381333931\n",  # two UPC columns: the first wins
    "\u2028036000291452\u2029\n".encode(),  # Unicode line/paragraph separators
    b"-" * 20 + b"\n" + b" " * 5000 + b"\n",
])
def test_odd_inputs_never_crash_and_never_enqueue_garbage(data):
    out = ingest(data)
    if out.error is None:
        assert out.totals["lines"] >= 1


@pytest.mark.parametrize("value", ["-", "--------------------", "- - -", "0-", "-0"])
def test_hyphen_only_lines_are_not_digits_not_a_crash(value):
    # Regression: "---" compacted to "" and normalize_gtin raised StopIteration, failing the
    # whole chunk task (and stalling the job) instead of reporting one invalid line.
    out = ingest(f"{UPC}\n{value}\n".encode())
    assert out.totals["items"] == 1 and out.lines[2]["code"] in ("not_digits", "bad_length")


@pytest.mark.parametrize("data", [b"0\r;\n036000291452\n", b"upc,title\rX\n036000291452\n",
                                  b"upc,name\r036000291452,a\r4006381333931,b\r"])
def test_bare_carriage_return_in_a_first_line_with_separators_is_not_a_crash(data):
    # Regression: sniff_format let csv.Error escape plan_file (ingest answered 500 and the job
    # stayed `ingesting`). Now the line is not a header and is reported as bare_carriage_return.
    out = ingest(data)
    assert out.error is None and out.plan.format.kind == "lines"
    assert out.lines[1]["code"] == "bare_carriage_return"
