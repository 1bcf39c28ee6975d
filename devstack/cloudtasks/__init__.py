"""Local Cloud Tasks v2 emulator (REST) with task-name dedup/tombstones, retry config and rate limits.

Run: python -m devstack.cloudtasks --host 127.0.0.1 --port 8123
"""
