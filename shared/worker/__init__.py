"""The item worker, by concern: `process` (one delivery, start to end), `delivery` (what Cloud Tasks
sent), `lease` (heartbeats, the last attempt's wait), `answers` (what to answer), `progress_requests`
(asking for a job's completion check) and `job_cache`. The state machine itself is
`shared/item_state.py`; persistence is `shared/store/`."""

from shared.worker.answers import WorkerOutcome
from shared.worker.delivery import TaskDelivery
from shared.worker.process import process_item_delivery

__all__ = ["TaskDelivery", "WorkerOutcome", "process_item_delivery"]
