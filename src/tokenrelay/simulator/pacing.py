"""When the simulator's chunks go out: a steady token rate, in few writes.

One answer's phases (reasoning, tool calls, content) share one timeline, so a reasoning
model's answer continues at the same rate where its thinking stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tokenrelay.asgi import Send

__all__ = ["Pacer"]

BATCH_TOKENS = 64  # chunks per ASGI send when unpaced (or late)
BATCH_BYTES = 16 * 1024


class Pacer:
    """Sends items at a steady rate on one timeline across phases (reasoning, content).

    Item k is due at ``t0 + k / rate``; each wake-up sends every item already due in one
    write (at most :data:`BATCH_TOKENS`), so high rates stay accurate with few sleeps.
    Rate 0 means unpaced: batches of 64 items or 16 KB, yielding to the loop in between.
    """

    def __init__(self, send: Send, rate: float) -> None:
        self.send = send
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.t0 = -1.0
        self.sent = 0
        self.lead = b""  # bytes to put in front of the next write (the role chunk)

    async def emit(self, count: int, batch: Callable[[int, int], bytes]) -> None:
        """Send ``count`` items; ``batch(i, j)`` is the bytes of items ``i`` to ``j - 1``."""
        send = self.send
        i = 0
        if self.interval == 0.0:
            while i < count:
                j = min(count, i + BATCH_TOKENS)
                body = batch(i, j)
                while len(body) > BATCH_BYTES and j - i > 1:  # keep writes near 16 KB
                    j = i + max(1, (j - i) // 2)
                    body = batch(i, j)
                await send({"type": "http.response.body", "body": self.lead + body,
                            "more_body": True})
                self.lead = b""
                self.sent += j - i
                i = j
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        while i < count:
            now = loop.time()
            if self.t0 < 0:
                self.t0 = now
            else:
                delay = self.t0 + self.sent * self.interval - now
                await asyncio.sleep(max(delay, 0.0))  # 0 still lets the loop breathe
                now = loop.time()
            due = int((now - self.t0) / self.interval) + 1 - self.sent
            j = i + min(max(due, 1), count - i, BATCH_TOKENS)
            await send({"type": "http.response.body", "body": self.lead + batch(i, j),
                        "more_body": True})
            self.lead = b""
            self.sent += j - i
            i = j
