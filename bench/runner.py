"""bench/run's driver: each bench in its own process with a time limit, tabulated against same-run
baselines into bench/results.md; fails when a bench is broken or leaves a process running.

`--only NAME` re-measures those benches and keeps the other benches' results (with their dates) from
the current bench/results.md. `--quick` runs every bench (or the --only ones) at tiny sizes, for seconds:
it checks that each runs, prints its result line and leaves nothing behind; it checks no goal and does
not touch bench/results.md (tests/integration/test_bench_quick.py runs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.procs import describe_process, end_processes, processes_with_env  # noqa: E402

BENCHES = ["cloudtasks", "ingest", "worker", "sweeper", "marketplace", "fairness", "capacity"]
# A bench's script is bench/<name>_bench.py unless named here.
SCRIPTS = {"capacity": "capacity_validation.py"}
RESULTS = ROOT / "bench" / "results.md"
# Set in every bench's environment (and so in every process a bench starts): what is still running
# with this run's value once all benches returned was left behind.
RUN_TAG = "UPCFAN_BENCH_RUN"
EXIT_GRACE_S = 5.0  # a bench's children may still be exiting when it returns


@dataclass
class BenchRun:
    name: str
    result: dict | None
    code: int | str
    took_s: float
    tail: str
    measured_at: str  # "YYYY-MM-DD HH:MM UTC" of the run that measured it


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def last_json(text: str) -> dict | None:
    """The BENCH_RESULT line, else the last stdout line that is a JSON object."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("BENCH_RESULT "):
            line = line[len("BENCH_RESULT "):]
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                continue
    return found


def rows_for(name: str, r: dict) -> list[tuple[str, str, str, str, str]]:
    """(bench, measure, this run vs same-run baseline, ratio, goal) rows; verdict computed."""
    out = []

    def add(measure, detail, ratio, goal_text, ok):
        out.append((name, measure, detail, ratio, f"{goal_text} {'ok' if ok else 'MISSED'}"))

    if name == "cloudtasks":
        c, raw = r.get("client_creates_per_s"), r.get("raw_creates_per_s")
        if c and raw:
            out.append((name, "official-client creates (REST) vs raw-HTTP creates", f"{c:,.0f}/s vs {raw:,.0f}/s",
                        f"{c / raw:.2f}", "(no goal stated; client overhead)"))
        g = r.get("grpc_creates_per_s")
        if g and raw:
            out.append((name, "official-client creates (gRPC) vs raw-HTTP creates", f"{g:,.0f}/s vs {raw:,.0f}/s",
                        f"{g / raw:.2f}", "(no goal stated; production's transport)"))
        rest_cpu, grpc_cpu = r.get("client_cpu_ms_per_create"), r.get("grpc_cpu_ms_per_create")
        if rest_cpu and grpc_cpu:
            out.append((name, "client CPU per create, gRPC vs REST", f"{grpc_cpu:.2f} ms vs {rest_cpu:.2f} ms "
                        f"(raw HTTP {r.get('raw_cpu_ms_per_create', 0):.2f} ms)", f"{grpc_cpu / rest_cpu:.2f}",
                        "(no goal stated; what limits fan-out)"))
        d = r.get("dispatches_per_s")
        rate = r.get("rate_limit") or r.get("rate") or 500.0
        if d:
            add("dispatch rate vs queue max_dispatches_per_second", f"{d:,.0f}/s vs {rate:g}/s", f"{d / rate:.2f}",
                "≥ 0.9 of the queue rate", d / rate >= 0.9)
    elif name == "ingest":
        if r.get("ratio") is not None:  # null when run with --rss-only
            add("fan-out (upload → all tasks) vs bare CreateTask loop",
                f"{r['fanout_s']:.1f} s vs {r['baseline_s']:.1f} s for {r['upcs']:,} tasks", f"{r['ratio']:.2f}",
                f"≥ {r.get('goal_ratio', 0.9)}", r["ratio"] >= r.get('goal_ratio', 0.9))
        if r.get("raw_ratio") is not None:
            add("fan-out rate vs the emulator's raw REST create rate (same emulator, same run)",
                f"{r['upcs'] / r['fanout_s']:,.0f}/s vs {r['raw_creates'] / r['raw_s']:,.0f}/s",
                f"{r['raw_ratio']:.2f}", f"≥ {r.get('goal_raw_ratio', 0.5)}", r["raw_ratio"] >= r.get("goal_raw_ratio", 0.5))
        if r.get("cpu_ratio"):
            cpu = r.get("cpu_s") or {}
            out.append((name, "CPU seconds of the whole stack: bare CreateTask loop vs fan-out (where fan-out's "
                              "wall-clock ratio is bounded on a machine whose cores the stack shares)",
                        f"{sum(cpu.get('baseline', {}).values()):.1f} s vs {sum(cpu.get('fanout', {}).values()):.1f} s "
                        f"(fan-out: {cpu.get('fanout')})", f"{r['cpu_ratio']:.2f}", "(no goal; explains the row above)"))
        add("peak RSS 1M lines vs 10k lines",
            f"{r['rss_large_kib'] / 1024:.0f} MiB vs {r['rss_small_kib'] / 1024:.0f} MiB", f"{r['rss_ratio']:.2f}",
            f"≤ {r.get('goal_rss_ratio', 1.2)}", r["rss_ratio"] <= r.get("goal_rss_ratio", 1.2))
    elif name == "worker":
        add("process_item_delivery vs bare claim+complete txns",
            f"{r['core_items_per_s']:,.1f}/s vs {r['baseline_items_per_s']:,.1f}/s", f"{r['ratio']:.2f}",
            "≥ 0.7", r["ratio"] >= 0.7)
        if r.get("transactions_per_item") is not None:
            tpi = r["transactions_per_item"]
            add("transactions per item (happy path)", f"{tpi:.2f}", f"{tpi / 2:.2f}", "= 2 per item", abs(tpi - 2) < 0.05)
    elif name == "marketplace":
        add("sandbox marketplace req/s (3,000 requests, 50 clients)", f"{r['req_per_s']:,}/s",
            f"{r['req_per_s'] / 500:.2f}", "≥ 500 req/s", r["req_per_s"] >= 500)
    elif name == "fairness":
        b, a = r["before"], r["after"]
        sizes = f"{r['small']:,} UPCs during {r['large']:,}"
        out.append((name, f"small job with a large one / solo, lane off ({sizes})",
                     f"{b['with_large_s']:.1f} s vs {b['solo_s']:.1f} s", f"{b['ratio']:.2f}",
                     "(same-run baseline: one shared item queue)"))
        add(f"small job with a large one / solo, small-jobs lane on ({sizes})",
            f"{a['with_large_s']:.1f} s vs {a['solo_s']:.1f} s", f"{a['ratio']:.2f}",
            f"≤ {r.get('goal_ratio', 2.0):g}", a["ratio"] <= r.get("goal_ratio", 2.0))
        out.append((name, "large job's time, lane on / lane off", f"{a['large_s']:.1f} s vs {b['large_s']:.1f} s",
                    f"{r['large_slowdown']:.2f}", "(no goal stated; what fairness costs the large job)"))
    elif name == "capacity":
        cal = r.get("calibration") or {}
        load = r.get("load_before") or [0.0]
        for j in r.get("jobs", []):
            add(f"capacity model vs {j['upcs']:,}-UPC job end to end (limits measured in the same run: fan-out "
                f"{cal.get('fanout_items_per_s')}/s, workers {cal.get('worker_items_per_s')}/s, a progress count "
                f"{cal.get('progress_count_s', '?')} s per {cal.get('items', 0):,} items; load {load[0]:.1f})",
                f"predicted {j['predicted_s']:.0f} s vs measured {j['measured_s']:.0f} s",
                f"{j['predicted_s'] / j['measured_s']:.2f}", f"within {r.get('goal_abs_error', 0.25):.0%}",
                abs(j["error"]) <= r.get("goal_abs_error", 0.25))
    elif name == "sweeper":
        budget = r.get("read_budget") or 3 * r.get("stalled", 100)
        for s in r.get("sweeps", []):
            where = f"over {r.get('jobs', 0):,} jobs ({r.get('stalled')} stalled)"
            add(f"reads of sweep '{s['sweep']}' {where}", f"{s['documents_read']} reads vs budget {budget}",
                f"{s['documents_read'] / budget:.2f}", "≤ 3 × stalled jobs", s["documents_read"] <= budget)
            if s.get("bare_ms"):
                add(f"sweep '{s['sweep']}' {where} vs its own I/O done bare",
                    f"{s['ms']:.0f} ms vs {s['bare_ms']:.0f} ms", f"{s['ms'] / s['bare_ms']:.2f}", "≤ 1.5",
                    s["ms"] / s["bare_ms"] <= 1.5)
    return out


def run_bench(name: str, timeout_s: float, env: dict[str, str], quick: bool = False,
              extra: list[str] | None = None) -> BenchRun:
    """One bench in its own process group; SIGINT at the time limit (or when bench/run itself is
    interrupted) so the bench's own cleanup runs, then SIGKILL to its group."""
    script = ROOT / "bench" / SCRIPTS.get(name, f"{name}_bench.py")
    if not script.exists():
        return BenchRun(name, None, "missing", 0.0, "", now_utc())
    argv = [*(["--quick"] if quick else []), *(extra or [])]
    print(f"== {name}: {' '.join([str(script.relative_to(ROOT)), *argv])}", flush=True)
    t0 = time.monotonic()
    # Its own session: a Ctrl-C on the terminal reaches bench/run alone, which then interrupts the
    # bench and waits for its cleanup (a bench's helpers are in groups of their own, bench/helpers.py).
    proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | str = proc.returncode
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        out, err = _interrupt(proc)
        if isinstance(exc, KeyboardInterrupt):
            raise
        code = "timeout"
    took = time.monotonic() - t0
    sys.stdout.write(out)
    print(f"== {name}: exit {code} in {took:.0f} s", flush=True)
    return BenchRun(name, last_json(out) if code == 0 else None, code, took, (out + err)[-1500:], now_utc())


def _interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGINT the bench (its cleanup stops its helpers), SIGKILL its group after 60 s; its output."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.communicate()


def previous_runs(path: Path) -> dict[str, BenchRun]:
    """The results kept in an earlier results.md (raw result lines, wall times, when measured)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    file_date = re.search(r"^- date: (.+)$", text, re.M)
    measured = dict(re.findall(r"(\w+) (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", _line_after(text, "Measured: ")))
    took = {n: float(s) for n, s in re.findall(r"(\w+) (\d+) s", _line_after(text, "Per-bench wall time: "))}
    raw = text.split("Raw result lines:", 1)[-1] if "Raw result lines:" in text else ""
    runs = {}
    for name, payload in re.findall(r"^(\w+): (\{.*\})$", raw, re.M):
        when = measured.get(name) or (file_date.group(1).strip() if file_date else "?")
        runs[name] = BenchRun(name, json.loads(payload), 0, took.get(name, 0.0), "", when)
    return runs


def _line_after(text: str, prefix: str) -> str:
    return next((line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)), "")


def leftover_processes(run_id: str) -> list[str]:
    """Processes the benches started that still run (after EXIT_GRACE_S); they are ended here."""
    procs = processes_with_env(RUN_TAG, run_id)
    _, still_running = psutil.wait_procs(procs, timeout=EXIT_GRACE_S)
    described = [describe_process(p) for p in still_running]
    end_processes(still_running)
    return described


def results_table(runs: list[BenchRun]) -> list[tuple[str, ...]]:
    table = [("bench", "measure", "this run vs same-run baseline", "ratio", "goal")]
    for run in runs:
        if run.result is None:
            table.append((run.name, "BROKEN", f"exit {run.code} after {run.took_s:.0f} s; no result line", "-", "-"))
        else:
            rows = rows_for(run.name, run.result)
            table.extend(rows or [(run.name, "no recognised fields", json.dumps(run.result)[:80], "-", "-")])
    return table


LOAD_AT_START = os.getloadavg()


def machine_lines() -> list[str]:
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    load = os.getloadavg()
    return [
        f"- machine: {os.cpu_count()} CPUs (nproc), {mem_kib / 1024 / 1024:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- load average (1/5/15 min) at the start: {LOAD_AT_START[0]:.1f} / {LOAD_AT_START[1]:.1f} / "
        f"{LOAD_AT_START[2]:.1f}, at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(other sessions share this machine; above 2 the figures are not a quiet-machine measurement)",
    ]


def results_md(runs: list[BenchRun], table: list[tuple[str, ...]], kept: list[str], left: list[str],
               notes: list[str] = ()) -> str:
    md = ["# Benchmark results", "", f"- date: {now_utc()}", *machine_lines(),
          "- produced by `bench/run`; every ratio is against a baseline measured in the same run",
          *(f"- note: {n}" for n in notes)]
    if kept:
        md.append(f"- not re-run this time, kept from the previous results: {', '.join(kept)} (see Measured)")
    md += ["", "| " + " | ".join(table[0]) + " |", "|" + "|".join("---" for _ in table[0]) + "|"]
    md += ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in table[1:]]
    md += ["", "Per-bench wall time: " + ", ".join(f"{r.name} {r.took_s:.0f} s" for r in runs),
           "", "Measured: " + ", ".join(f"{r.name} {r.measured_at}" for r in runs)]
    for r in runs:
        if r.result is None:
            md += ["", f"## {r.name}: BROKEN (exit {r.code})", "", "```", r.tail.strip(), "```"]
    if left:
        md += ["", "## LEFT RUNNING by the benches (ended by bench/run)", ""] + [f"- {p}" for p in left]
    md += ["", "Raw result lines:", "", "```"]
    md += [f"{r.name}: {json.dumps(r.result)}" for r in runs if r.result is not None]
    return "\n".join(md + ["```", ""])


def quick_report(fresh: dict[str, BenchRun], left: list[str]) -> int:
    """--quick: one line per bench (ran, result fields), no goals; 1 when one broke or left a process."""
    print()
    for run in fresh.values():
        if run.result is None:
            print(f"QUICK {run.name}: BROKEN (exit {run.code} after {run.took_s:.0f} s)\n{run.tail.strip()}")
        else:
            print(f"QUICK {run.name}: ok in {run.took_s:.0f} s: {json.dumps(run.result)[:300]}")
    print("QUICK_SUMMARY " + json.dumps({"ok": [r.name for r in fresh.values() if r.result is not None],
                                         "broken": [r.name for r in fresh.values() if r.result is None],
                                         "left_running": left}), flush=True)
    return 1 if left or any(r.result is None for r in fresh.values()) else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run")
    ap.add_argument("--only", action="append", choices=BENCHES, default=[])
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default 900, 120 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="every bench at tiny sizes: that it runs, reports and leaves nothing behind; "
                         "no goal checked, bench/results.md untouched")
    ap.add_argument("--bench-args", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments for one bench, e.g. ingest='--upcs 20000' (shown in results.md)")
    ap.add_argument("--note", action="append", default=[], help="a line for results.md (e.g. what else ran)")
    args = ap.parse_args()
    extra: dict[str, list[str]] = {}
    for spec in args.bench_args:
        name, _, rest = spec.partition("=")
        if name not in BENCHES:
            ap.error(f"--bench-args {spec!r}: the bench must be one of {', '.join(BENCHES)}")
        extra[name] = shlex.split(rest)
    timeout = args.timeout or (120.0 if args.quick else 900.0)
    run_id = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{RUN_TAG: run_id})
    fresh: dict[str, BenchRun] = {}
    try:
        for name in args.only or BENCHES:
            fresh[name] = run_bench(name, timeout, env, args.quick, extra.get(name))
    finally:  # also on Ctrl-C: whatever a bench started and left is listed and ended
        left = leftover_processes(run_id)
        if left:
            print("bench/run: FAILED: processes left running by the benches (now ended):\n  " + "\n  ".join(left),
                  flush=True)
    if args.quick:
        return quick_report(fresh, left)
    previous = previous_runs(RESULTS) if args.only else {}
    kept = [n for n in BENCHES if n not in fresh and n in previous]
    runs = [fresh.get(n) or previous[n] for n in BENCHES if n in fresh or n in kept]

    table = results_table(runs)
    widths = [max(len(str(r[i])) for r in table) for i in range(5)]
    print()
    for r in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    RESULTS.write_text(results_md(runs, table, kept, left, args.note))
    print("\nwrote bench/results.md")
    return 1 if left or any(r.result is None for r in fresh.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
