"""UPC/EAN/GTIN validation and normalisation to GTIN-14 with python-stdnum; specific reasons."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stdnum import ean
from stdnum.exceptions import InvalidChecksum, InvalidComponent, InvalidFormat, InvalidLength

_SCI_RE = re.compile(r"^[0-9](\.[0-9]+)?[eE]\+?[0-9]+$")
_ACCEPTED_LENGTHS = {8: "EAN-8", 12: "UPC-A", 13: "EAN-13", 14: "GTIN-14"}


@dataclass(frozen=True)
class Gtin:
    gtin14: str
    kind: str  # UPC-A, EAN-8, EAN-13, GTIN-14


class InvalidUpcError(ValueError):
    """A line that is not a valid UPC/EAN/GTIN; `code` is stable, the message says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def normalize_gtin(raw: str) -> Gtin:
    """Validate one UPC-A/EAN-8/EAN-13/GTIN-14 and return it as a GTIN-14 key."""
    text = raw.strip()
    if not text:
        raise InvalidUpcError("empty", "empty value")
    if _SCI_RE.match(text):
        raise InvalidUpcError(
            "scientific_notation",
            f"'{text}' is in scientific notation (a spreadsheet rounded the number); export the column as text",
        )
    compact = text.replace(" ", "").replace("-", "")
    if not compact:  # only hyphens and spaces: no character to name below
        raise InvalidUpcError("not_digits", f"'{_clip(text)}' contains no digits")
    if not compact.isdigit():
        bad = next(ch for ch in compact if not ch.isdigit())
        raise InvalidUpcError("not_digits", f"'{_clip(text)}' contains non-digit character {bad!r}")
    if not compact.isascii():
        raise InvalidUpcError("not_digits", f"'{_clip(text)}' contains non-ASCII digits")
    length = len(compact)
    if length not in _ACCEPTED_LENGTHS:
        hint = ""
        if length in (7, 11):
            hint = f" (a {length + 1}-digit code that lost its leading zero?)"
        raise InvalidUpcError(
            "bad_length",
            f"'{_clip(text)}' has {length} digits; expected 8 (EAN-8), 12 (UPC-A), 13 (EAN-13) or 14 (GTIN-14){hint}",
        )
    try:
        ean.validate(compact)
    except InvalidChecksum:
        expected = ean.calc_check_digit(compact[:-1])
        raise InvalidUpcError(
            "bad_check_digit",
            f"{_ACCEPTED_LENGTHS[length]} '{compact}' has check digit {compact[-1]}, expected {expected}",
        ) from None
    except (InvalidFormat, InvalidLength, InvalidComponent) as exc:  # pragma: no cover - guarded above
        raise InvalidUpcError("invalid", f"'{_clip(text)}': {exc}") from None
    return Gtin(gtin14=compact.zfill(14), kind=_ACCEPTED_LENGTHS[length])


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "…"
