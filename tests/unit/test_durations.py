"""shared.durations.format_duration: the alerts' coarse form and the CLI's exact ETA form."""

from __future__ import annotations

import pytest

from shared.durations import format_duration


@pytest.mark.parametrize(
    "secs,expected",
    [(45, "45s"), (20 * 60 + 5, "20m"), (2 * 3600 + 5 * 60, "2h 05m"), (-3, "0s"), (59.9, "59s"), (3600, "1h 00m")],
)
def test_coarse_form_for_alerts(secs, expected):
    assert format_duration(secs) == expected


@pytest.mark.parametrize(
    "secs,expected",
    [(None, "–"), (0, "0s"), (3.4, "3s"), (59.6, "1m00s"), (5 * 60 + 3, "5m03s"), (3600 + 2 * 60 + 5, "1h02m05s"),
     (-2, "0s")],
)
def test_exact_form_for_the_cli_eta(secs, expected):
    assert format_duration(secs, exact=True) == expected


def test_unknown_duration_in_coarse_form():
    assert format_duration(None) == "–"
