"""Benchmark the results manifest writer (shared/results.py): memory stays bounded as jobs grow.

The store is a stand-in that makes each page on demand (items by line, line records by id, one line in
ten a line record), so the figures are the writer's own: two pages of documents, the merge, the CSV
writer and the upload buffer. Each size runs in a fresh process; it writes the CSV to a sink that
counts bytes (a blob writer holds up to `UPLOAD_CHUNK_BYTES` more: 4 MiB, a constant).

Reported per size: rows, seconds, tracemalloc peak of Python allocations during the write (KiB), and
the process's peak RSS growth over its baseline after imports (KiB, from getrusage).

Usage: python bench/results_bench.py [--sizes 10000,100000,1000000]
The last stdout line is a JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(n: int, queue) -> None:
    from shared import results
    from shared.model import Item
    from shared.store.memory import MemoryStore

    def is_record(line: int) -> bool:
        return line % 10 == 0

    class GeneratedStore(MemoryStore):
        """Lines 1..n; pages made on demand, so the store itself holds nothing."""

        def page_items_by_line(self, job_id, *, limit, after_line=None):
            out, line = [], (after_line or 0) + 1
            while len(out) < limit and line <= n:
                if not is_record(line):
                    gtin = f"{line:014d}"
                    out.append(Item.from_doc({"gtin": gtin, "upc": gtin[2:], "line": line, "status": "succeeded",
                                              "error": None, "result": {"offer_id": f"offer-{line}"}}, gtin))
                line += 1
            return out

        def page_lines(self, job_id, *, limit, outcome=None, after_id=None):
            out, line = [], (int(after_id) if after_id else 0) + 1
            line += (-line) % 10
            while len(out) < limit and line <= n:
                out.append((f"{line:09d}", {"line": line, "raw": "12AB", "outcome": "invalid", "code": "not_digits",
                                            "reason": "letters in a UPC"}))
                line += 10
            return out

    class Sink:
        bytes = 0

        def write(self, text: str) -> int:
            self.bytes += len(text)
            return len(text)

    store = GeneratedStore()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sink = Sink()
    tracemalloc.start()
    t0 = time.perf_counter()
    rows = results.write_csv(sink, results.manifest_rows("bench", store=store))
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    queue.put({"lines": n, "rows": rows, "csv_bytes": sink.bytes, "seconds": round(seconds, 2),
               "tracemalloc_peak_kib": peak // 1024,
               "rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    out = []
    ctx = mp.get_context("spawn")
    for n in (int(s) for s in args.sizes.split(",")):
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(n, queue))
        proc.start()
        result = queue.get(timeout=1800)
        proc.join()
        print(f"{n:>9,} lines: {result['rows']:,} rows in {result['seconds']}s, "
              f"tracemalloc peak {result['tracemalloc_peak_kib']:,} KiB, RSS growth {result['rss_growth_kib']:,} KiB",
              flush=True)
        out.append(result)
    print(json.dumps({"results_bench": out}))


if __name__ == "__main__":
    main()
