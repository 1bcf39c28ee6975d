"""Deadlines that add up (issue 14): for every task kind, its worst case < its dispatch deadline <=
the timeout deploy gives the function it calls; the numbers behind the item budget are the code's."""

from __future__ import annotations

import pytest

from infra import deploy
from shared import deadlines
from shared.handlers import marketplace_draft
from shared.handlers.base import HANDLER_BUDGET_S, ItemContext
from shared.handlers.marketplace_draft import MarketplaceDraftHandler
from shared.tasks import ITEM_TASK, TASK_KINDS
from shared.worker import lease

GTIN = "00012345678905"


@pytest.mark.parametrize("kind", TASK_KINDS, ids=lambda k: k.name)
def test_budget_under_deadline_under_function_timeout(kind):
    timeouts = {spec.name: spec.timeout_s for spec in deploy.function_specs(shards=4)}
    assert deadlines.budget_s(kind) < kind.dispatch_deadline_s <= timeouts[kind.function]
    assert timeouts[kind.function] == deadlines.function_timeout_s(kind.function)


def test_worker_timeout_is_the_item_deadline():
    # Cloud Tasks gives up on an item exactly when the worker would stop serving it.
    assert deadlines.function_timeout_s("worker") == ITEM_TASK.dispatch_deadline_s


def test_item_budget_arithmetic():
    # a bulk delivery's yield to small jobs (5 s), wait cap + one poll, the handler's 75 s time budget (its
    # in-attempt retries inside it), the claim, complete and CreateTask retry waits (3.0 + 4.6 + 6.2 s),
    # and the store-calls allowance
    assert deadlines.marketplace_handler_s() == HANDLER_BUDGET_S == 75.0
    assert deadlines.item_budget_s() == pytest.approx(5.0 + 65.0 + 1.0 + 75.0 + 13.8 + 15.0)
    assert deadlines.item_budget_s() < ITEM_TASK.dispatch_deadline_s


def test_handler_budget_holds_one_full_pass_at_every_timeout():
    # 5 marketplace calls at 3 s connect + 10 s read: a slow marketplace without a single fault
    # never runs out of budget; the budget only ever cuts retries.
    assert deadlines.marketplace_pass_s() == 5 * (3.0 + 10.0)
    assert HANDLER_BUDGET_S >= deadlines.marketplace_pass_s()


def test_last_attempt_wait_is_capped_whatever_the_lease():
    assert lease.last_attempt_wait_s(60.0) == 65.0
    assert lease.last_attempt_wait_s(600.0) == lease.LAST_ATTEMPT_WAIT_MAX_S


class _Response:
    def __init__(self, status: int, body: dict | None):
        self.status_code, self._body = status, body
        self.content = b"{}" if body is not None else b""
        self.headers: dict = {}
        self.text = ""

    def json(self):
        return self._body


class _Session:
    """Answers the handler's longest path: no offer, create meets an existing one, look it up again."""

    def __init__(self):
        self.calls: list[tuple[str, str, object]] = []
        self.offer_lookups = 0

    def request(self, method, url, timeout=None, **kwargs):
        self.calls.append((method, url, timeout))
        if method == "GET" and "/offer" in url:
            self.offer_lookups += 1
            if self.offer_lookups == 1:
                return _Response(200, {"total": 0, "offers": []})
            return _Response(200, {"total": 1, "offers": [{"offerId": "9"}]})
        if method == "POST":
            return _Response(409, {"errors": [{"errorId": 25002, "message": "Offer entity already exists"}]})
        return _Response(200, {"title": "t"})


def test_marketplace_longest_path_makes_max_calls_each_with_the_counted_timeouts(monkeypatch):
    session = _Session()
    monkeypatch.setattr(marketplace_draft, "_session", lambda: session)
    ctx = ItemContext(job_id="j", gtin=GTIN, upc="012345678905", line=1, round=1, attempt=1, options={})
    assert MarketplaceDraftHandler("http://marketplace.invalid").handle(ctx)["offer_id"] == "9"
    assert len(session.calls) == marketplace_draft.MAX_CALLS
    timeouts = {t for _, _, t in session.calls}
    assert timeouts == {(marketplace_draft.CONNECT_TIMEOUT_S, marketplace_draft.READ_TIMEOUT_S)}
