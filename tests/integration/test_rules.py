"""firestore.rules deny every client request (the emulator enforces rules on unauthenticated REST calls)."""

from __future__ import annotations

import uuid

import pytest
import requests

pytestmark = pytest.mark.integration

# The emulator compiles firestore.rules on the first client request: under load that one call took
# longer than 10 s (two CI runs on 2 cores), so the calls get time enough for it.
RULES_CALL_TIMEOUT_S = 60


def _docs_url(env: dict) -> str:
    return (
        f"http://{env['FIRESTORE_EMULATOR_HOST']}/v1/projects/{env['GOOGLE_CLOUD_PROJECT']}"
        "/databases/(default)/documents"
    )


@pytest.mark.parametrize("collection", ["jobs", "stall_events", "alert_state", "anything"])
def test_client_reads_and_writes_are_denied(stack_env, firestore_db, collection):
    doc_id = f"rules-{uuid.uuid4().hex[:12]}"
    base = _docs_url(stack_env)
    body = {"fields": {"x": {"stringValue": "client"}}}

    # No "Authorization: Bearer owner": a client request, subject to the rules.
    create = requests.post(f"{base}/{collection}", params={"documentId": doc_id}, json=body, timeout=RULES_CALL_TIMEOUT_S)
    assert create.status_code == 403, create.text
    assert create.json()["error"]["status"] == "PERMISSION_DENIED"

    # The server SDK (admin, rules bypassed) can write it; the client still can't read or change it.
    firestore_db.collection(collection).document(doc_id).set({"x": "server"})
    try:
        get = requests.get(f"{base}/{collection}/{doc_id}", timeout=RULES_CALL_TIMEOUT_S)
        assert get.status_code == 403, get.text
        patch = requests.patch(f"{base}/{collection}/{doc_id}", json=body, timeout=RULES_CALL_TIMEOUT_S)
        assert patch.status_code == 403, patch.text
        delete = requests.delete(f"{base}/{collection}/{doc_id}", timeout=RULES_CALL_TIMEOUT_S)
        assert delete.status_code == 403, delete.text
        listing = requests.get(f"{base}/{collection}", timeout=RULES_CALL_TIMEOUT_S)
        assert listing.status_code == 403, listing.text
        assert firestore_db.collection(collection).document(doc_id).get().to_dict() == {"x": "server"}
    finally:
        firestore_db.collection(collection).document(doc_id).delete()


def test_owner_requests_bypass_rules(stack_env):
    """The control case: the same REST call as admin succeeds, so the 403s above come from the rules."""
    doc_id = f"rules-{uuid.uuid4().hex[:12]}"
    base = _docs_url(stack_env)
    owner = {"Authorization": "Bearer owner"}
    resp = requests.post(
        f"{base}/rules_probe", params={"documentId": doc_id}, json={"fields": {}}, headers=owner, timeout=RULES_CALL_TIMEOUT_S
    )
    assert resp.status_code == 200, resp.text
    requests.delete(f"{base}/rules_probe/{doc_id}", headers=owner, timeout=RULES_CALL_TIMEOUT_S)
