"""The capacity model (shared/capacity.py): closed-form cross-checks, monotonicity, binding-limit naming, CLI."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shared.capacity import LIMITS, CapacityParams, assess, firestore_ramp_ops_per_s, lifted, simulate


def steady(n: int, **over) -> CapacityParams:
    """No ramp, no cold start, instant plan and fan-out: only the work stage's constant rate limits remain."""
    base = dict(upcs=n, firestore_ramp=False, cold_start_s=0.0, plan_overhead_s=0.0, plan_read_mb_per_s=1e9,
                fanout_items_per_s_per_instance=1e9, create_task_s=1e-9, progress_check_s=0.0,
                progress_check_latency_s=0.0, progress_count_s_per_item=0.0)
    return CapacityParams(**{**base, **over})


def test_closed_form_dispatch_rate_bound():
    p = steady(100_000, item_queues=2, queue_dispatches_per_s=300.0)
    expected = 100_000 / 600 + p.item_service_s
    assert simulate(p).total_s == pytest.approx(expected, rel=0.02)
    assert assess(p).binding == "dispatch_rate"


def test_closed_form_marketplace_quota_bound():
    p = steady(50_000, marketplace_rps=400.0)  # 4 calls per item: 100 items/s
    assert simulate(p).total_s == pytest.approx(50_000 / 100 + p.item_service_s, rel=0.02)
    assert assess(p).binding == "marketplace_rate"


def test_closed_form_worker_slots_bound_is_littles_law():
    p = steady(20_000, worker_instances=2, worker_threads=10, marketplace_call_s=0.5)  # 20 slots x 1/2.06 s
    rate = 20 / p.item_service_s
    assert simulate(p).total_s == pytest.approx(20_000 / rate + p.item_service_s, rel=0.02)
    assert assess(p).binding == "worker_slots"


def test_firestore_ramp_is_500_then_plus_half_every_five_minutes():
    p = CapacityParams(upcs=1)
    assert [firestore_ramp_ops_per_s(p, t) for t in (0, 299, 300, 600, 900)] == [500, 500, 750, 1125, 1687.5]
    assert firestore_ramp_ops_per_s(p.model_copy(update={"firestore_ramp": False}), 0) == math.inf


def test_ramp_bound_matches_its_integral():
    # 3 writes + 2 reads = 5 operations per item: 60k items are 300k operations; the ramp takes 150k in its
    # first 5 minutes (500/s) and the other 150k at 750/s in 200 s: 500 s while the ramp is saturated throughout.
    p = steady(60_000, firestore_ramp=True, queue_dispatches_per_s=1e6, queue_max_concurrent=10**6,
               worker_instances=1000)
    assert simulate(p).total_s == pytest.approx(500 + p.item_service_s, rel=0.03)
    assert assess(p).binding == "firestore_ramp"


def test_without_exemptions_the_sequential_index_cap_binds_at_500_writes():
    p = steady(50_000, index_exemptions=False, queue_dispatches_per_s=1e6, queue_max_concurrent=10**6,
               worker_instances=1000)  # 3 writes per item: 500/3 items/s
    assert simulate(p).total_s == pytest.approx(50_000 * 3 / 500, rel=0.02)
    assert assess(p).binding == "firestore_sequential_index"


def test_one_million_default_names_the_ramp_and_the_next_limit():
    report = assess(CapacityParams(upcs=1_000_000, item_queues=4))
    assert report.binding == "firestore_ramp"
    assert report.next_limit in LIMITS and report.next_limit != "firestore_ramp"
    assert report.next_total_s < report.prediction.total_s
    data = report.to_dict()
    assert data["binding_limit"] == "firestore_ramp" and data["stages_s"]["completed"] == pytest.approx(
        report.prediction.total_s, abs=0.1)


def test_host_cpu_shared_serialises_fanout_and_work():
    # Alone: fan-out 100/s, workers 50/s. On one host the CPU runs N/100 + N/50 seconds of work.
    p = steady(3_000, fanout_items_per_s_per_instance=100.0, ingest_instances=1, worker_instances=1,
               worker_items_per_s_per_instance=50.0, host_cpu_shared=True)
    assert simulate(p).total_s == pytest.approx(3_000 / 100 + 3_000 / 50, rel=0.03)
    # The biggest lever is the workers' CPU cost (it removes 60 s); a host of its own per stage leaves the
    # slower stage alone: max(30 s, 60 s).
    report = assess(p)
    assert report.binding == "worker_cpu"
    assert simulate(lifted(p, "host_cpu")).total_s == pytest.approx(60, rel=0.03)


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_lifting_any_limit_gives_valid_parameters(limit):
    p = CapacityParams(upcs=10_000, index_exemptions=False, host_cpu_shared=True)
    assert simulate(lifted(p, limit)).total_s > 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 200_000), shards=st.integers(1, 8), rate=st.floats(10, 500))
def test_more_upcs_never_faster_and_more_queues_never_slower(n, shards, rate):
    # Without the Firestore ramp: under it, fan-out and work share one ops budget and the model slows
    # both by the same factor, so faster dispatch takes ops from the fan-out and a run with one more
    # queue can end a little later (146,521 UPCs: 919 s with 1 queue, 936 s with 2).
    p = CapacityParams(upcs=n, item_queues=shards, queue_dispatches_per_s=rate, firestore_ramp=False)
    t = simulate(p).total_s
    assert simulate(p.model_copy(update={"upcs": n * 2})).total_s >= t - max(1.0, 0.005 * t)
    assert simulate(p.model_copy(update={"item_queues": shards + 1})).total_s <= t * 1.01 + 1.0


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1_000, 100_000), rps=st.floats(20, 5_000))
def test_a_lower_marketplace_quota_is_never_faster(n, rps):
    p = CapacityParams(upcs=n, marketplace_rps=rps)
    # Up to the simulation's step (under the Firestore ramp the two stages trade its share step by step).
    t = simulate(p).total_s
    assert simulate(p.model_copy(update={"marketplace_rps": rps / 2})).total_s >= t - max(1.0, 0.005 * t)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="upcs"):
        CapacityParams(upcs=0)
    with pytest.raises(ValueError, match="worker_min_instances"):
        CapacityParams(upcs=1, worker_instances=1, worker_min_instances=2)
    with pytest.raises(ValueError, match="shards"):
        CapacityParams(upcs=1, shards=2)  # unknown field: extra="forbid"


def test_cli_capacity_json_and_errors():
    from upcfan_cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["capacity", "--upcs", "200000", "--shards", "2", "--no-ramp", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["upcs"] == 200_000 and data["params"]["item_queues"] == 2 and data["binding_limit"] in LIMITS
    table = runner.invoke(app, ["capacity", "--upcs", "200000"])
    assert table.exit_code == 0 and "binding limit" in table.output
    bad = runner.invoke(app, ["capacity", "--upcs", "10", "--shards", "0"])
    assert bad.exit_code == 1 and "--shards" in bad.output
    slow = runner.invoke(app, ["capacity", "--upcs", "200000", "--shards", "2", "--no-ramp", "--json",
                               "--count-us-per-item", "100"])
    slow_data = json.loads(slow.output)
    assert slow_data["params"]["progress_count_s_per_item"] == pytest.approx(1e-4)
    # 200k items: a 20 s count (checks back to back: 1.5 counts) instead of 0.4 s (busy 0.08 of a window)
    assert slow_data["total_s"] == pytest.approx(data["total_s"] + 20.0 * 1.5 - 0.4 * 1.08, abs=0.2)
    negative = runner.invoke(app, ["capacity", "--upcs", "10", "--count-us-per-item", "-1"])
    assert negative.exit_code == 1 and "--count-us-per-item" in negative.output


@pytest.mark.parametrize("count_s_per_item, window_s, expected_s", [
    (0.0, 5.0, 5.5),  # window + dispatch latency
    (1e-4, 5.0, 5.5 + 1.0 * (1 + 0.2 / 2)),  # 10k items: a 1 s count, busy a fifth of each window
    (1e-3, 5.0, 5.5 + 10.0 * 1.5),  # a 10 s count: checks back to back, the last item lands mid-count
])
def test_completion_waits_for_the_window_and_one_count_and_a_half_when_counts_overlap(count_s_per_item, window_s,
                                                                                     expected_s):
    from shared.capacity import completion_s

    p = CapacityParams(upcs=10_000, progress_check_s=window_s, progress_check_latency_s=0.5,
                       progress_count_s_per_item=count_s_per_item)
    assert completion_s(p) == pytest.approx(expected_s)
    assert simulate(p).total_s - simulate(p).work_done_s == pytest.approx(expected_s)
