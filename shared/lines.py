"""Reading UPC files: line iteration over byte ranges, format sniffing and per-line classification."""

from __future__ import annotations

import codecs
import csv
from dataclasses import dataclass
from typing import Callable, Iterator

from shared.exceptions import UnreadableFileError
from shared.gtin import InvalidUpcError, normalize_gtin

BLOCK_BYTES = 256 * 1024
# Longer lines cannot be a UPC or a sane CSV row; only a prefix is kept for the report.
MAX_LINE_BYTES = 4096
RAW_CLIP = 80
UTF8_BOM = b"\xef\xbb\xbf"
UPC_COLUMN_NAMES = ("upc", "gtin", "ean", "barcode")
_DELIMITERS = (",", ";", "\t", "|")

ReadRange = Callable[[int, int], bytes]  # (start, end_exclusive) -> bytes


@dataclass(frozen=True)
class RawLine:
    line_no: int  # 1-based, counting every newline in the file
    start: int  # byte offset of the line's first byte
    data: bytes  # without the line ending; clipped to MAX_LINE_BYTES
    length: int  # full length in bytes (may exceed len(data))


def iter_raw_lines(read_range: ReadRange, start: int, end: int, first_line: int) -> Iterator[RawLine]:
    """Yield the lines that start in [start, end), reading in blocks: memory stays O(block)."""
    pos = start
    line_no = first_line
    line_start = start
    buf = bytearray()
    buf_len = 0  # true length of the current line, clipped bytes included
    while pos < end:
        block = read_range(pos, min(pos + BLOCK_BYTES, end))
        if not block:
            break
        view_start = 0
        while True:
            nl = block.find(b"\n", view_start)
            piece = block[view_start:] if nl < 0 else block[view_start:nl]
            room = MAX_LINE_BYTES - len(buf)
            if room > 0:
                buf += piece[:room]
            buf_len += len(piece)
            if nl < 0:
                break
            yield _finish(line_no, line_start, buf, buf_len)
            line_no += 1
            line_start = pos + nl + 1
            buf = bytearray()
            buf_len = 0
            view_start = nl + 1
        pos += len(block)
    if buf_len:
        yield _finish(line_no, line_start, buf, buf_len)


def _finish(line_no: int, start: int, buf: bytearray, length: int) -> RawLine:
    data = bytes(buf)
    if data.endswith(b"\r") and length == len(data):
        data = data[:-1]
        length -= 1
    return RawLine(line_no=line_no, start=start, data=data, length=length)


@dataclass(frozen=True)
class FileFormat:
    """How data lines are read: one value per line, or a CSV column."""

    kind: str  # "lines" | "csv"
    delimiter: str = ","
    column: int = 0
    header_line: int = 0  # line number of the CSV header (skipped), 0 = none

    def to_dict(self) -> dict:
        return {"kind": self.kind, "delimiter": self.delimiter, "column": self.column, "header_line": self.header_line}

    @classmethod
    def from_dict(cls, d: dict) -> "FileFormat":
        return cls(kind=d["kind"], delimiter=d.get("delimiter", ","), column=int(d.get("column", 0)),
                   header_line=int(d.get("header_line", 0)))


def detect_binary(first_block: bytes) -> None:
    """Refuse compressed, binary and UTF-16 files with a reason a person can act on."""
    if first_block.startswith(b"\x1f\x8b"):
        raise UnreadableFileError("file is gzip-compressed; upload the uncompressed text file", code="compressed_file")
    if first_block.startswith(b"PK\x03\x04"):
        raise UnreadableFileError("file is a ZIP archive (or an .xlsx workbook); export it as CSV or plain text",
                                  code="compressed_file")
    if first_block.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UnreadableFileError("file is UTF-16 encoded; save it as UTF-8", code="utf16_file")
    nul = first_block.find(b"\x00")
    if nul >= 0:
        raise UnreadableFileError(f"file contains binary data (NUL byte at offset {nul}); upload a UTF-8 text file",
                                  code="binary_file")


class Utf8Checker:
    """Incremental UTF-8 validation over the whole file, reporting the first bad byte's offset."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._offset = 0

    def feed(self, block: bytes, final: bool = False) -> None:
        nul = block.find(b"\x00")
        if nul >= 0:
            raise UnreadableFileError(
                f"file contains binary data (NUL byte at offset {self._offset + nul}); upload a UTF-8 text file",
                code="binary_file")
        try:
            self._decoder.decode(block, final)
        except UnicodeDecodeError as exc:
            raise UnreadableFileError(
                f"file is not valid UTF-8 (byte 0x{block[exc.start]:02x} at offset {self._offset + exc.start}); "
                "save it as UTF-8", code="not_utf8") from None
        self._offset += len(block)


def is_skippable(text: str) -> bool:
    return not text or text.startswith("#")


def sniff_format(text: str, line_no: int) -> FileFormat | None:
    """Decide the format from the first data line: a CSV header naming a UPC column, or plain lines."""
    if text.strip().strip('"').strip().lower() in UPC_COLUMN_NAMES:  # a one-column CSV: just the header
        return FileFormat(kind="csv", delimiter=",", column=0, header_line=line_no)
    for delim in _DELIMITERS:
        if delim in text:
            try:
                row = next(csv.reader([text], delimiter=delim))
            except csv.Error:  # e.g. a bare carriage return: not a header; the line is reported later
                continue
            cells = [c.strip().strip('"').strip().lower() for c in row]
            for name in UPC_COLUMN_NAMES:
                if name in cells:
                    return FileFormat(kind="csv", delimiter=delim, column=cells.index(name), header_line=line_no)
    return None


@dataclass(frozen=True)
class LineVerdict:
    """One line's fate at fan-out: skipped, invalid (code+reason) or a GTIN-14 to enqueue."""

    kind: str  # "skip" | "invalid" | "item"
    upc: str = ""
    gtin: str = ""
    code: str = ""
    reason: str = ""


def classify_line(raw: RawLine, fmt: FileFormat, strip_bom: bool) -> LineVerdict:
    data = raw.data
    if strip_bom and data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    if raw.length > MAX_LINE_BYTES:
        return LineVerdict("invalid", upc=_clip_bytes(data), code="line_too_long",
                           reason=f"line is {raw.length:,} bytes long; a UPC line is at most {MAX_LINE_BYTES:,}")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return LineVerdict("invalid", upc=_clip_bytes(data), code="not_utf8", reason="line is not valid UTF-8")
    if is_skippable(text):
        return LineVerdict("skip")
    if fmt.kind == "csv":
        if raw.line_no == fmt.header_line:
            return LineVerdict("skip")
        try:
            cells = next(csv.reader([text], delimiter=fmt.delimiter))
        except csv.Error as exc:
            return LineVerdict("invalid", upc=_clip(text), code="bad_csv", reason=f"CSV row cannot be parsed: {exc}")
        if fmt.column >= len(cells):
            return LineVerdict("invalid", upc=_clip(text), code="missing_column",
                               reason=f"CSV row has {len(cells)} fields; the UPC column is field {fmt.column + 1}")
        value = cells[fmt.column].strip()
    else:
        if "\r" in text:
            return LineVerdict("invalid", upc=_clip(text), code="bare_carriage_return",
                               reason="line contains a bare carriage return; save the file with LF or CRLF line endings")
        delim = next((d for d in _DELIMITERS if d in text), None)
        if delim is not None:
            return LineVerdict("invalid", upc=_clip(text), code="multiple_fields",
                               reason=f"line has several fields separated by {delim!r}; use one UPC per line "
                                      "or a CSV file with a 'upc' header")
        value = text
    try:
        gtin = normalize_gtin(value)
    except InvalidUpcError as exc:
        return LineVerdict("invalid", upc=_clip(value), code=exc.code, reason=exc.message)
    return LineVerdict("item", upc=_clip(value), gtin=gtin.gtin14)


def _clip(text: str) -> str:
    return text if len(text) <= RAW_CLIP else text[:RAW_CLIP] + "…"


def _clip_bytes(data: bytes) -> str:
    return _clip(data[:RAW_CLIP * 4].decode("utf-8", errors="replace"))
