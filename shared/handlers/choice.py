"""Which handler a job runs: request, then object metadata, then configuration; the deprecated booleans map here only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from shared.config import DEPRECATED_DEFAULT_FLAGS, SettingsError, parse_bool, settings
from shared.handlers.dry_run import DryRunHandler
from shared.handlers.marketplace_draft import MarketplaceDraftHandler
from shared.handlers.registry import check_handler_name

HANDLER_METADATA_KEY = "upcfan-handler"
# Deprecated spellings, still honoured: the handler choice before handlers had names.
TEST_MODE_METADATA_KEY = "upcfan-test-mode"
CREATE_DRAFTS_METADATA_KEY = "upcfan-create-drafts"

_DRY_RUN = DryRunHandler.name
_MARKETPLACE_DRAFT = MarketplaceDraftHandler.name
# What the built-in handlers are in the deprecated booleans (test_mode, create_drafts): a boolean given
# at a higher level still overrides its half of a handler named below it, as it did before names
# (create_drafts=false over a marketplace_draft default is a dry run; test_mode=true is always one).
_AS_FLAGS = {_DRY_RUN: (True, False), _MARKETPLACE_DRAFT: (False, True)}


@dataclass(frozen=True)
class HandlerChoice:
    """What one level (a request, an object's metadata, the configuration) says about the handler."""

    handler: str | None = None
    test_mode: bool | None = None  # deprecated: `handler: dry_run`
    create_drafts: bool | None = None  # deprecated: `handler: marketplace_draft`
    source: str = "handler"  # named in the error when `handler` is unknown

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> "HandlerChoice":
        metadata = metadata or {}

        def flag(key: str) -> bool | None:
            return None if metadata.get(key) is None else parse_bool(metadata[key])

        return cls(handler=str(metadata.get(HANDLER_METADATA_KEY) or "").strip() or None,
                   test_mode=flag(TEST_MODE_METADATA_KEY), create_drafts=flag(CREATE_DRAFTS_METADATA_KEY),
                   source=f"object metadata {HANDLER_METADATA_KEY}")

    @classmethod
    def configured(cls) -> "HandlerChoice":
        """The configured default: UPCFAN_DEFAULT_HANDLER, never a silent dry run when it is unset (issue 14,
        defect 9). Ingest and api refuse to start without it; any other caller that needs it fails here."""
        name = settings().default_handler
        if not name:
            raise SettingsError(
                "UPCFAN_DEFAULT_HANDLER is not set and neither the request nor the object metadata names a handler: "
                "set it to dry_run or marketplace_draft (scripts/deploy --default-handler sets it; "
                f"{' and '.join(DEPRECATED_DEFAULT_FLAGS)} are no longer read)", code="settings_missing",
                details={"missing": ["UPCFAN_DEFAULT_HANDLER"]})
        return cls(handler=name, source="UPCFAN_DEFAULT_HANDLER")

    def as_metadata(self) -> dict[str, str]:
        """The object metadata that makes an uploaded file choose as this request does."""
        metadata = {HANDLER_METADATA_KEY: self.handler} if self.handler else {}
        for key, value in ((CREATE_DRAFTS_METADATA_KEY, self.create_drafts), (TEST_MODE_METADATA_KEY, self.test_mode)):
            if value is not None:
                metadata[key] = "true" if value else "false"
        return metadata


def _from_flags(test_mode: bool | None, create_drafts: bool | None) -> str:
    """test_mode wins (never touches the marketplace); create_drafts → marketplace draft; neither → dry run."""
    if test_mode:
        return _DRY_RUN
    if create_drafts:
        return _MARKETPLACE_DRAFT
    return _DRY_RUN


def choose_handler(*choices: HandlerChoice | Callable[[], HandlerChoice]) -> str:
    """The handler name the highest level decides, a known one (else 400 `unknown_handler`).

    A level's handler name beats its own deprecated booleans. The booleans merge field by field,
    highest level first, and decide as soon as they can (test_mode true, or both known). A level given
    as a callable is only asked when the levels above leave the choice open.
    """
    test_mode = create_drafts = None
    for choice in choices:
        if callable(choice):
            choice = choice()
        if choice.handler is not None:
            name = check_handler_name(choice.handler, choice.source)
            if name not in _AS_FLAGS:
                return name
            as_test_mode, as_create_drafts = _AS_FLAGS[name]
            return _from_flags(as_test_mode if test_mode is None else test_mode,
                               as_create_drafts if create_drafts is None else create_drafts)
        test_mode = choice.test_mode if test_mode is None else test_mode
        create_drafts = choice.create_drafts if create_drafts is None else create_drafts
        if test_mode or (test_mode is not None and create_drafts is not None):
            break
    return _from_flags(test_mode, create_drafts)


def job_handler_name(request: HandlerChoice, metadata: Mapping[str, Any] | None) -> str:
    """A new job's handler: the request's choice, then the object's metadata, then the configured default."""
    return choose_handler(request, HandlerChoice.from_metadata(metadata), HandlerChoice.configured)
