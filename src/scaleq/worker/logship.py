"""Ship a running attempt's output to the server in chunks, about four times a second.

Output is buffered and sent by one background task, so a chatty job never waits on the network. If the server
refuses the lease (409) the attempt was replaced or cancelled and ``on_stale`` stops it. While the server is
unreachable the buffer keeps the newest output up to a bound and notes what it had to drop. Once the server says
the attempt's log is at its cap (``max_log_bytes``), output is no longer sent, only counted, and the count goes up
with the next flush (the server adds it to what ``scaleq logs`` reports dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from scaleq.client import ApiError, Client, Unreachable
from scaleq.loop import wait_set

FLUSH_SECONDS = 0.25
MAX_BUFFER = 8 * 1024 * 1024


class LogShipper:
    def __init__(self, client: Client, lease: str, on_stale: Callable[[], None], give_up_after: float = 600.0) -> None:
        self.client = client
        self.give_up_after = give_up_after
        self._stale = False
        self.lease = lease
        self.on_stale = on_stale
        self._buf: list[tuple[str, bytes]] = []
        self._size = 0
        self._dropped = 0
        #: The server said the attempt's log is at its cap; what is written since is counted in _unsent, not sent.
        self._capped = False
        self._unsent = 0
        self._task: asyncio.Task[None] | None = None
        self._more = asyncio.Event()
        self._closing = asyncio.Event()

    @property
    def capped(self) -> bool:
        """Whether the server said this attempt's log is at its cap (output is counted since, not sent)."""
        return self._capped

    async def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        if self._capped:  # the server keeps no more of this attempt's log: count it, send only the count
            self._unsent += len(data)
            self._more.set()
            return
        self._buf.append((stream, data))
        self._size += len(data)
        while self._size > MAX_BUFFER and len(self._buf) > 1:
            _, old = self._buf.pop(0)
            self._size -= len(old)
            self._dropped += len(old)
        self._more.set()

    async def __aenter__(self) -> LogShipper:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # never cancel a send in flight (its chunks would be lost): ask the loop to finish, then wait for it
        self._closing.set()
        self._more.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if exc[0] is not None:
            return  # the attempt was stopped (cancelled, abandoned): its last output has no one to go to
        # The final output must land before the result is reported, and it is retried as the result is: a server
        # that is away (restarting) gets it when it is back.
        deadline = time.monotonic() + self.give_up_after
        delay = 0.2
        while (self._buf or self._unsent) and not self._stale:
            if await self._flush():
                continue
            if self._stale or time.monotonic() > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _loop(self) -> None:
        while not self._closing.is_set():
            await self._more.wait()
            self._more.clear()
            await self._flush()
            await wait_set(self._closing, FLUSH_SECONDS)

    async def _flush(self) -> bool:
        """Send what is buffered; False when nothing more can be sent now."""
        if self._capped and self._buf:  # capped while these waited: they are counted, not sent
            self._unsent += self._size
            self._buf, self._size = [], 0
        if not self._buf and not self._unsent:
            return False
        chunks, self._buf, self._size = self._buf, [], 0
        if self._dropped:
            chunks.insert(0, ("system", f"[scaleq: {self._dropped} bytes of output dropped]\n".encode()))
            self._dropped = 0
        try:
            self._capped = await self.client.append_logs(self.lease, chunks, dropped=self._unsent)
            self._unsent = 0
            return True
        except Unreachable:
            self._buf[:0] = chunks
            self._size += sum(len(d) for _, d in chunks)
            return False
        except ApiError as exc:
            if exc.stale:
                self._stale = True
                self.on_stale()
            return False
