"""Sandbox marketplace throughput: the marketplace as its own process (as in the stack), hammered
with a mix of catalog lookups and offer creates from 50 concurrent aiohttp clients. Goal: >= 500 req/s
so the sandbox never limits a worker benchmark. Prints a table line and `BENCH_RESULT {json}`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.helpers import QUICK_HELP, interrupt_on_sigterm, start_group, stop_group  # noqa: E402
OFFER = "/sell/inventory/v1/offer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """The marketplace as its own process (as in the stack) serves >= 500 req/s on this machine."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    requests_n = 300 if ap.parse_args().quick else 3000
    interrupt_on_sigterm()
    port = _free_port()
    token = secrets.token_urlsafe(16)  # the marketplace routes require it, as in the stack
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), UPCFAN_MARKETPLACE_TOKEN=token)
    proc = start_group(
        [sys.executable, "-m", "devstack.marketplace", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{url}/_health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "marketplace did not start"
            time.sleep(0.05)

        async def hammer(n: int, concurrency: int) -> float:
            sem = asyncio.Semaphore(concurrency)
            conn = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=conn, headers={"Authorization": f"Bearer {token}"}) as s:

                async def one(i: int) -> int:
                    async with sem:
                        gtin = f"{i % 1000:014d}"
                        if i % 2:
                            async with s.get(f"{url}/catalog/v1/product/{gtin}") as r:
                                await r.read()
                                return r.status
                        body = {"sku": gtin, "marketplaceId": "EBAY_US", "format": "FIXED_PRICE", "availableQuantity": 1}
                        async with s.post(url + OFFER, json=body, headers={"Idempotency-Key": f"k{i}"}) as r:
                            await r.read()
                            return r.status

                t0 = time.perf_counter()
                statuses = await asyncio.gather(*(one(i) for i in range(n)))
                elapsed = time.perf_counter() - t0
            assert set(statuses) <= {200, 201}
            return n / elapsed

        rate = asyncio.run(hammer(requests_n, 50))
        print(f"{f'sandbox marketplace ({requests_n:,} requests, 50 clients)':<50} {rate:>8.0f} req/s  goal >= 500")
        print("BENCH_RESULT " + json.dumps({"bench": "marketplace", "requests": requests_n, "req_per_s": round(rate), "goal_req_per_s": 500}))
    finally:
        stop_group(proc)


if __name__ == "__main__":
    main()
