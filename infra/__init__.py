"""upcfan infra: desired-state plan/apply for queues, scheduler, IAM, eventarc, secrets, Firestore.

Run `python -m infra plan|apply --project P --region R [--bucket B] [--item-queue-shards N]`.
Importing this package creates no client and makes no call.
"""
