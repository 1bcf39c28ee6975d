"""Line reading and classification: BOM, CRLF, blanks, comments, CSV, hostile lines."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.exceptions import UnreadableFileError
from shared.lines import (MAX_LINE_BYTES, FileFormat, Utf8Checker, classify_line, detect_binary, iter_raw_lines,
                          sniff_format)


def reader(data: bytes, block: int | None = None):
    def read(start, end):
        return data[start:end]
    return read


def lines_of(data: bytes):
    return list(iter_raw_lines(reader(data), 0, len(data), 1))


def test_crlf_lf_and_unterminated_last_line():
    got = lines_of(b"a\r\nbb\n\nccc")
    assert [(l.line_no, l.data) for l in got] == [(1, b"a"), (2, b"bb"), (3, b""), (4, b"ccc")]


@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=40),
       st.integers(1, 200))
def test_any_split_point_yields_each_line_exactly_once(parts, cut):
    data = b"\n".join(parts) + b"\n"
    whole = [(l.line_no, l.data) for l in lines_of(data)]
    # Cut at a line start, as the planner does, and read both halves with the right first line.
    starts = [0] + [i + 1 for i, ch in enumerate(data) if ch == 10][:-1]
    boundary = starts[min(cut, len(starts) - 1)]
    first_line_2 = data[:boundary].count(b"\n") + 1
    halves = list(iter_raw_lines(reader(data), 0, boundary, 1)) + list(
        iter_raw_lines(reader(data), boundary, len(data), first_line_2))
    assert [(l.line_no, l.data.rstrip(b"\r")) for l in halves] == [(n, d.rstrip(b"\r")) for n, d in whole]


def test_long_line_is_clipped_but_measured():
    data = b"1" * (MAX_LINE_BYTES * 3) + b"\n036000291452\n"
    got = lines_of(data)
    assert got[0].length == MAX_LINE_BYTES * 3 and len(got[0].data) == MAX_LINE_BYTES
    assert classify_line(got[0], FileFormat("lines"), False).code == "line_too_long"
    assert classify_line(got[1], FileFormat("lines"), False).gtin == "00036000291452"


@pytest.mark.parametrize("head,code", [(b"\x1f\x8b\x08", "compressed_file"), (b"PK\x03\x04", "compressed_file"),
                                       (b"\xff\xfe0\x00", "utf16_file"), (b"0360\x0000", "binary_file")])
def test_binary_files_are_refused_with_a_reason(head, code):
    with pytest.raises(UnreadableFileError) as err:
        detect_binary(head)
    assert err.value.code == code


def test_invalid_utf8_reports_offset():
    checker = Utf8Checker()
    checker.feed(b"036000291452\n")
    with pytest.raises(UnreadableFileError) as err:
        checker.feed(b"\xe9t\xe9\n", final=True)
    assert err.value.code == "not_utf8" and "offset 13" in err.value.message


def test_csv_header_is_sniffed_and_column_used():
    fmt = sniff_format("sku;UPC;title", 3)
    assert fmt == FileFormat(kind="csv", delimiter=";", column=1, header_line=3)
    header, row, short = lines_of(b'x\nx\nsku;UPC;title\nA1;036000291452;"x; y"\nA2\n')[2:]
    assert classify_line(header, fmt, False).kind == "skip"
    assert classify_line(row, fmt, False).gtin == "00036000291452"
    assert classify_line(short, fmt, False).code == "missing_column"


def test_bom_comment_blank_and_mixed_separator_lines():
    bom, comment, blank, mixed = lines_of(b"\xef\xbb\xbf036000291452\n# note\n   \n036000291452,4006381333931\n")
    assert classify_line(bom, FileFormat("lines"), True).gtin == "00036000291452"
    assert classify_line(comment, FileFormat("lines"), False).kind == "skip"
    assert classify_line(blank, FileFormat("lines"), False).kind == "skip"
    assert classify_line(mixed, FileFormat("lines"), False).code == "multiple_fields"


def test_one_column_csv_header_is_skipped():
    fmt = sniff_format('"UPC"', 1)
    assert fmt == FileFormat(kind="csv", delimiter=",", column=0, header_line=1)
    header, row = lines_of(b'"UPC"\n036000291452\n')
    assert classify_line(header, fmt, True).kind == "skip"
    assert classify_line(row, fmt, False).gtin == "00036000291452"


@pytest.mark.parametrize("path", ["gs://upcfan-uploads/.", "gs://upcfan-uploads/..", "gs://b-1/a\nb", "gs://\t/x",
                                  "s3://b/x", "gs://bucket", "gs://bucket/dir/"])
def test_gcs_paths_that_name_no_object_are_bad_requests(path):
    from shared.exceptions import BadRequestError
    from shared.gcs import parse_gcs_path

    with pytest.raises(BadRequestError) as err:
        parse_gcs_path(path)
    assert err.value.code == "bad_gcs_path"
