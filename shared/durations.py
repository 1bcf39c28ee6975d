"""Durations for humans: one formatter for alerts ('2h 05m') and the CLI's ETA ('1h02m05s')."""

from __future__ import annotations

UNKNOWN = "–"


def format_duration(seconds: float | None, *, exact: bool = False) -> str:
    """How long something took or will take.

    Coarse (default), for alerts where "how long stalled" needs no seconds once past a minute:
    '2h 05m' / '17m' / '45s', whole units truncated. Exact (`exact=True`), for the CLI's ETA,
    which counts down: '1h02m05s' / '5m03s' / '45s', rounded to the second. None (not known
    yet) is '–'; a negative duration is 0.
    """
    if seconds is None:
        return UNKNOWN
    whole = max(0, int(round(seconds) if exact else int(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if exact:
        return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m" if minutes else f"{secs}s"
