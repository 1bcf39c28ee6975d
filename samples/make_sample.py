"""Write samples/sample-upcs.txt (and the 22-line samples/small-upcs.txt): valid UPC-A/EAN-13 codes (python-stdnum check digits), a few
invalid lines with bad check digits, a few in-file duplicates, a comment and a blank line.

Deterministic (fixed seed), so the committed file and a regenerated one are identical.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from stdnum import ean

VALID = 2000
OUT = Path(__file__).with_name("sample-upcs.txt")
# A quick one for tests and trying the CLI: 20 valid, 1 bad check digit, 1 duplicate, comment, blank line.
SMALL = Path(__file__).with_name("small-upcs.txt")


def _code(rng: random.Random, length: int) -> str:
    body = "".join(str(rng.randrange(10)) for _ in range(length - 1))
    return body + ean.calc_check_digit(body)


def build(seed: int = 20260101, valid_n: int = VALID, bad: int = 5, dups: int = 5) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    valid: list[str] = []
    while len(valid) < valid_n:
        code = _code(rng, 12 if len(valid) % 3 else 13)  # two thirds UPC-A, one third EAN-13
        if code.zfill(14) not in seen:
            seen.add(code.zfill(14))
            valid.append(code)
    lines = [f"# upcfan sample: {valid_n} valid UPC-A/EAN-13, {bad} bad check digits, {dups} duplicates", ""]
    half = valid_n // 2
    lines += valid[:half]
    for code in valid[:bad]:  # bad check digit: last digit off by one
        lines.append(code[:-1] + str((int(code[-1]) + 1) % 10))
    lines += valid[half:]
    lines += valid[10:10 + dups]  # duplicates of earlier lines
    return lines


def main() -> int:
    OUT.write_text("\n".join(build()) + "\n")
    SMALL.write_text("\n".join(build(seed=20260102, valid_n=20, bad=1, dups=1)) + "\n")
    print(f"wrote {OUT} and {SMALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
