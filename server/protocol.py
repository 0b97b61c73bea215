"""uvicorn's httptools protocol with the two connection limits it lacks.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and the number of
connections (``limit_concurrency``), but not how long a client may take to send a request's
head, nor how large the head may grow: a client that never finishes its headers holds a
connection (and a file descriptor) forever, and a 32 MB header value is buffered whole. This
subclass closes a connection whose head is not complete within ``header_timeout_s`` (408) or
grows past ``max_header_bytes`` (431). Bodies have their own deadline in the request path.

It also mends how uvicorn ends a connection that holds pipelined requests: uvicorn marks only
its newest request as disconnected (``self.cycle``), so the one still running wrote its answer
into the closed transport, which raised, and the server logged a traceback and counted a 500
for a client that had only hung up. Here every request of the connection not yet answered is
marked (its answer is dropped, as for a lone request) and flagged ``CLIENT_GONE`` in its scope's
state, so the request's log line and metrics say 499.

``python -m server`` configures it from the settings; with ``uvicorn --factory`` pass
``--http server.protocol:GuardedHttpToolsProtocol`` and it reads the settings from the
environment itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.middleware import CLIENT_GONE
from server.settings import Settings

log = logging.getLogger("server.connections")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes: ClassVar[int | None] = None
    header_timeout_s: ClassVar[float | None] = None

    @classmethod
    def configure(cls, settings: Settings) -> type[GuardedHttpToolsProtocol]:
        cls.max_header_bytes = settings.max_header_bytes
        cls.header_timeout_s = settings.header_timeout_s
        return cls

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if self.max_header_bytes is None:  # uvicorn --http server.protocol:...: read the env
            type(self).configure(Settings.from_env())
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True  # a new connection owes us a request head
        self._head_timer: asyncio.TimerHandle | None = None
        # this connection's requests whose answer is not complete, oldest first (answered in
        # that order, so the answered ones leave from the left)
        self._unanswered: deque[Any] = deque()

    # ------------------------------------------------------------------ head deadline
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True  # its send() becomes a no-op, as uvicorn's own is
                cycle.message_event.set()  # a receive() waiting for the body wakes to the loss
                cycle.scope["state"][CLIENT_GONE] = True
        self._unanswered.clear()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            assert self.header_timeout_s is not None
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head:
            # Nothing was sent: close quietly. Part of a head: say why before closing.
            self._refuse(408 if self._head_bytes else None)

    # ------------------------------------------------------------------ head size
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head:  # the head is still incomplete after this chunk: it all counts
            self._head_bytes += len(data)
            assert self.max_header_bytes is not None
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # the request's first byte: the app measures the head's parse from here
        self.scope["state"]["received_at"] = time.perf_counter()
        self._in_head = True
        self._head_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()
        unanswered = self._unanswered
        while unanswered and unanswered[0].response_complete:
            unanswered.popleft()
        unanswered.append(self.cycle)

    def _refuse(self, status: int | None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._in_head = False
        if status is not None:
            log.info("closing a connection: %d", status, extra={"fields": {"status": status}})
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                % (status, _REASONS[status])
            )
        self.transport.close()
