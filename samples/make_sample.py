"""Write samples/sample-upcs.txt: valid UPC-A/EAN-13 codes (python-stdnum check digits), a few
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


def _code(rng: random.Random, length: int) -> str:
    body = "".join(str(rng.randrange(10)) for _ in range(length - 1))
    return body + ean.calc_check_digit(body)


def build(seed: int = 20260101) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    valid: list[str] = []
    while len(valid) < VALID:
        code = _code(rng, 12 if len(valid) % 3 else 13)  # two thirds UPC-A, one third EAN-13
        if code.zfill(14) not in seen:
            seen.add(code.zfill(14))
            valid.append(code)
    lines = ["# upcfan sample: 2000 valid UPC-A/EAN-13, 5 bad check digits, 5 duplicates", ""]
    lines += valid[:1000]
    for code in valid[:5]:  # bad check digit: last digit off by one
        lines.append(code[:-1] + str((int(code[-1]) + 1) % 10))
    lines += valid[1000:]
    lines += valid[10:15]  # duplicates of earlier lines
    return lines


def main() -> int:
    OUT.write_text("\n".join(build()) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
