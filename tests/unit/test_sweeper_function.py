"""The sweeper HTTP entry: report JSON on 200, 500 with a specific message when Firestore is unreachable."""

from __future__ import annotations

import json


from shared import sweeper
from shared.exceptions import StoreUnavailableError
from deployed_env import create_function_app


def _client():
    return create_function_app("sweeper").test_client()


def test_report_json_and_one_log_line(monkeypatch, capsys):
    monkeypatch.setattr(sweeper, "run_sweep", lambda: sweeper.SweepReport(checked=3, flagged=1, documents_read=4))
    resp = _client().post("/")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["checked"] == 3 and body["flagged"] == 1 and body["documents_read"] == 4
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"sweep_done"' in line]
    assert len(lines) == 1 and lines[0]["flagged"] == 1


def test_firestore_unreachable_is_500(monkeypatch):
    def boom():
        raise StoreUnavailableError("Firestore unreachable during sweep (ServiceUnavailable); nothing was flagged")

    monkeypatch.setattr(sweeper, "run_sweep", boom)
    resp = _client().post("/")
    assert resp.status_code == 500
    assert resp.get_json()["error"]["code"] == "store_unavailable"
    assert "Firestore unreachable" in resp.get_json()["error"]["message"]
