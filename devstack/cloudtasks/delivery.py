"""HTTP delivery of task attempts over pooled keep-alive connections that targets have not yet closed."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import aiohttp

# A target closes an idle keep-alive connection on its own clock: gunicorn, which serves the
# functions through functions-framework (it leaves gunicorn's keepalive at the default), after
# 2 s idle, swept once a second. A task sent on a connection the target is closing is lost before
# any handler sees it, and aiohttp raises ServerDisconnectedError. aiohttp keeps idle connections
# for 15 s by default; it checks a connection's idle time when it takes it from the pool, so
# reusing only connections idle for less than this stays clear of the targets' timers, with a
# second to spare for a busy event loop. Connections are still reused within a burst of tasks.
#
# A request lost that way is not resent: aiohttp itself resends only idempotent methods, because
# a connection closed before any answer may also be a handler that died after reading the request
# (RFC 9110 9.2.2). Tasks are POSTs, and such an attempt must count, as in Cloud Tasks.
POOLED_CONNECTION_IDLE_S = 1.0


class Outcome(NamedTuple):
    """One delivery's result: the HTTP status, or no status and why (a google.rpc code name)."""

    status: int | None
    error_kind: str | None
    message: str


class Delivery:
    """Sends task requests through one pooled aiohttp session (opened by start(), on the loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=POOLED_CONNECTION_IDLE_S, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def send(self, method: str, url: str, body: bytes, headers: dict, deadline_s: float) -> Outcome:
        assert self._session is not None, "Delivery.start() was not awaited"
        try:
            async with self._session.request(
                method, url, data=body or None, headers=headers,
                timeout=aiohttp.ClientTimeout(total=deadline_s), allow_redirects=False,
            ) as resp:
                await resp.read()
                return Outcome(resp.status, None, "")
        except asyncio.TimeoutError:
            return Outcome(None, "DEADLINE_EXCEEDED", f"no response within the dispatch deadline ({deadline_s:g}s)")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(None, "UNAVAILABLE", f"{type(exc).__name__}: {exc}")
