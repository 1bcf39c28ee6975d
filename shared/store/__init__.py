"""Persistence: the `Store` interface and its backends (Firestore in production, memory in unit tests)."""

from __future__ import annotations

from functools import lru_cache

from shared.store.base import TXN_COUNTER, Store, TransactionCounter, valid_doc_id


@lru_cache(maxsize=1)
def default_store() -> Store:
    """The Firestore store over the lazily created client (`shared.clients.firestore_client`)."""
    from shared.store.firestore import FirestoreStore

    return FirestoreStore()


__all__ = ["TXN_COUNTER", "Store", "TransactionCounter", "default_store", "valid_doc_id"]
