"""/health (`shared.operations.health`) checks the queue of every item lane in use: the first bulk queue
and, when small jobs have a lane (UPCFAN_SMALL_JOB_MAX_LINES > 0), the small-jobs queue (issue 17, item 3)."""

from __future__ import annotations

import pytest

from shared import operations
from shared.config import settings


class FakeTasks:
    def __init__(self, down: set[str]) -> None:
        self.down, self.asked = down, []

    def get_queue(self, name, timeout=None):
        self.asked.append(name.rsplit("/", 1)[-1])
        if name.rsplit("/", 1)[-1] in self.down:
            raise ConnectionError("refused")
        return {}


class Pingable:
    def ping(self, timeout_s):
        return None


@pytest.fixture
def health(monkeypatch):
    monkeypatch.setattr(operations, "_store", lambda: Pingable())

    def run(max_lines: str, down: set[str] = frozenset()):
        monkeypatch.setenv("UPCFAN_SMALL_JOB_MAX_LINES", max_lines)
        settings.cache_clear()
        fake = FakeTasks(set(down))
        monkeypatch.setattr("shared.clients.tasks_client", lambda: fake)
        ok, parts = operations.health()
        return ok, parts, fake.asked

    yield run
    settings.cache_clear()


def test_health_checks_the_small_lane_when_it_is_on(health):
    assert health("5000") == (True, {"firestore": "ok", "item_queue": "ok", "small_item_queue": "ok"},
                              ["upcfan-items", "upcfan-items-small"])
    ok, parts, _ = health("5000", down={"upcfan-items-small"})
    assert not ok and parts["small_item_queue"].startswith("unreachable: ConnectionError") and parts["item_queue"] == "ok"


def test_health_leaves_the_small_lane_alone_when_it_is_off(health):
    assert health("0") == (True, {"firestore": "ok", "item_queue": "ok"}, ["upcfan-items"])
