"""Sweeper function (Cloud Scheduler, OIDC): runs one sweep and returns its report; flags only."""

import functions_framework
from flask import Request, jsonify

from shared.exceptions import StoreUnavailableError
from shared.log import log_event, setup_logging
from shared.required_settings import require_settings

setup_logging()
require_settings("sweeper")  # a missing or bad setting stops the start, naming it


@functions_framework.http
def sweeper(request: Request):
    from shared.sweeper import run_sweep  # lazy: clients and heavy imports stay out of cold start

    try:
        report = run_sweep()
    except StoreUnavailableError as exc:
        log_event("sweep_failed", severity="ERROR", logger="upcfan.sweeper", code=exc.code, error=exc.message)
        return jsonify({"error": exc.to_dict()}), 500
    body = report.to_dict()
    # One structured line per sweep (the findings list is capped in the report).
    log_event("sweep_done", logger="upcfan.sweeper", **{k: v for k, v in body.items() if k != "findings"},
              findings=body["findings"][:20])
    return jsonify(body), 200
