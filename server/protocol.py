"""uvicorn's httptools protocol with the connection limits it lacks.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and the number of
connections (``limit_concurrency``), but not how long a client may take to send a request's
head, nor how large the head may grow: a client that never finishes its headers holds a
connection (and a file descriptor) forever, and a 32 MB header value is buffered whole. This
subclass closes a connection whose head is not complete within ``header_timeout_s`` (408) or
grows past ``max_header_bytes`` (431). Bodies have their own deadline in the request path.

A head's size is counted two ways, since the parser reports no byte offsets: a complete head by
what it parsed into (request line and headers, as written with single spaces), so a head that
arrives in one read is held to the limit too; a head still incomplete after a read by the raw
bytes received since it began, so a header that never ends is cut off after the limit plus at
most one read. Where a head begins in the middle of a read (pipelined requests), the bytes of
that read before it belong to the earlier requests (their heads, as parsed, and their bodies)
and are not its.

After the head, it bounds what uvicorn would read on without limit: a chunked body's trailers
(header fields the parser buffers whole) are held to ``max_header_bytes`` and never join the
request's headers, and a request answered before its body arrived whole ends the connection:
its answer says ``connection: close`` (RFC 9112, 9.6: uvicorn said nothing, so a client that
sent the rest of the body, or its next request, on the same connection lost them), the rest of
the body is read and dropped until the keep-alive timeout, then the connection closes (uvicorn
read on with no limit: each read cancelled its keep-alive timer, so a client sending a byte now
and then held the connection for good).

It also bounds the requests pipelined on one connection (``MAX_PIPELINED``) and how small the
pieces of a body may be (``MAX_SMALL_PIECES``, ``MIN_PIECE_BYTES``), counts what it refuses
(``http_refused_total``, through the lifespan's state), and mends how uvicorn ends a
connection that holds pipelined requests: uvicorn flags only its newest request as
disconnected (``self.cycle``), so the one still running wrote its answer into the closed
transport, which raised, and the server logged a traceback and counted a 500 for a client that
had only hung up. Here every request of the connection not yet answered is set disconnected
(its answer is dropped, as for a lone request) and flagged ``CLIENT_GONE`` in its scope's state,
so the request's log line and metrics say 499. A prediction still waiting for its images' work
is told too (``ON_CLIENT_GONE``), and its work not yet started is dropped; for that the
connection reads on once a request's body is whole (uvicorn stopped reading past 64 KB of body
until the answer was out, so the hang-up of a client that sent a large batch went unseen).

``python -m server`` configures it from the settings; with ``uvicorn --factory`` pass
``--http server.protocol:GuardedHttpToolsProtocol`` and it reads the settings from the
environment itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import deque
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import error_body
from server.ids import new_id
from server.metrics import REFUSAL_COUNTER
from server.middleware import (
    CLIENT_GONE,
    FRAGMENTED_BODY,
    ON_CLIENT_GONE,
    OVER_CONNECTIONS,
    PROBE_PATHS,
    REQUEST_ID_HEADER,
)
from server.settings import Settings

log = logging.getLogger("server.connections")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
# What the API's error body says for a refusal made here, before a request reaches the app (the
# README's table of errors): its code, and its message (400's: the parser's own words after it)
_REFUSALS = {
    400: ("malformed_request", "the request is not valid HTTP/1.1"),
    408: ("request_timeout", "the request head did not arrive within HEADER_TIMEOUT_S"),
    431: ("header_too_large", "the request head is over MAX_HEADER_BYTES"),
}
# Requests a client may pipeline on one connection ahead of their answers. uvicorn parses every
# request of a read at once and queues each, and resumes reading each time an answer is sent, so
# a client sending tiny pipelined GETs without reading its answers grew the queue by thousands a
# read (300 MB of RSS for 10 MB of requests); past this many the connection is closed.
MAX_PIPELINED = 64
# answered past MAX_CONNECTIONS (the liveness and readiness probes of Kubernetes, KServe, HAProxy)
_PROBE_TARGETS = frozenset(path.encode() for path in PROBE_PATHS)
# Each piece of a body is a Python call on the event loop: a body chunked into 1-byte pieces
# (6 bytes a piece on the wire) kept it about 70% busy for one client. Past this many pieces, a
# body whose pieces average under MIN_PIECE_BYTES is refused (400 fragmented_body) and the
# connection closed after the answer. Clients chunk by the kilobyte; a body sent whole arrives
# in one piece per read.
MAX_SMALL_PIECES = 1024
MIN_PIECE_BYTES = 256
# Most seconds a connection whose request was answered before its body arrived whole stays open
# (reading and dropping the rest) when KEEP_ALIVE_TIMEOUT_S is longer.
LINGER_S = 5.0


class _CycleTransport:
    """The connection's transport as one request's cycle sees it. Closing it after an answer
    sent before the request's body arrived whole is left to the protocol, which lingers and then
    closes (``on_response_complete``): a close with unread bytes makes the kernel answer them
    with a reset, which could cost the client the answer itself."""

    __slots__ = ("_cycle", "_protocol", "_transport", "get_extra_info", "is_closing", "write")

    def __init__(self, transport: Any, protocol: GuardedHttpToolsProtocol, cycle: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._cycle = cycle
        self.write = transport.write
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info

    def close(self) -> None:
        if self._cycle.response_complete and self._protocol._receiving is self._cycle:
            return  # answered, its body still arriving: the protocol lingers, then closes
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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
        self._head_bytes = 0  # the incomplete head's bytes received before the current read
        self._in_head = True  # a new connection owes us a request head
        self._began_in_read = False  # the current request began in the read being parsed
        self._read_used = 0  # bytes of the read being parsed that earlier requests took
        self._refused = False  # the connection is being closed: what else arrives is not parsed
        self._pieces = 0  # the current request's body pieces (-1: refused as fragmented)
        self._piece_bytes = 0
        # the request whose body is arriving (None: none is): answered before its body is
        # whole, the connection lingers, then closes (on_response_complete)
        self._receiving: Any = None
        # that request, when it would keep the connection alive: until its body is whole its
        # cycle says it will not, so an answer sent before then says connection: close
        self._close_unless_whole: Any = None
        self._lingering = False  # what arrives is the rest of an answered body: dropped
        self._body_in_read = False  # the read being parsed held some of that body
        self._bodiless_bytes = 0  # bytes read since that body's last piece (chunked trailers)
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
                state = cycle.scope["state"]
                state[CLIENT_GONE] = True
                gone = state.get(ON_CLIENT_GONE)
                if gone is not None:
                    gone()  # a prediction waiting for its images: their work is dropped
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
            if self._head_bytes:
                self._refuse(408, reason="head_timeout")
            else:
                self._refuse(None)

    # ------------------------------------------------------------------ head size
    def data_received(self, data: bytes) -> None:
        if self._refused or self._lingering:
            # Lingering: never parsed, and uvicorn's keep-alive timer, which would be reset by
            # every read, keeps running: the connection closes when it fires
            return
        self._began_in_read = False
        self._read_used = 0
        self._body_in_read = False
        super().data_received(data)
        if self._refused:
            return
        assert self.max_header_bytes is not None
        if self._in_head:  # a head is incomplete after this read
            if self._began_in_read:  # it began here, after what the earlier requests took
                self._head_bytes = max(0, len(data) - self._read_used)
            else:  # the whole read is head
                self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, reason="head_too_large")
        elif self._receiving is not None:
            # A body's reads bring some of it; after a chunked body's last chunk come its
            # trailers, header fields the parser buffers whole (a single endless value is
            # rebuilt at every read): held to the head's limit, as a head is
            self._bodiless_bytes = 0 if self._body_in_read else self._bodiless_bytes + len(data)
            if self._bodiless_bytes > self.max_header_bytes:
                self._refuse(431, reason="head_too_large")

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        # the request's first byte: the app measures the head's parse from here
        self.scope["state"]["received_at"] = time.perf_counter()
        self._in_head = True
        self._began_in_read = True
        self._head_bytes = 0
        self._pieces = 0  # this request's body: pieces and bytes so far
        self._piece_bytes = 0
        self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, a field is a chunked body's trailer: uvicorn would append it to the
        # list the request's scope already holds as its headers (a header the app had checked
        # could change under it); the app reads no trailers, so they are dropped
        if self._in_head:
            super().on_header(name, value)

    def _parsed_head_bytes(self) -> int:
        """The complete head's size as parsed: 'METHOD URL HTTP/1.1', 'name: value' lines."""
        size = len(self.parser.get_method()) + len(self.url) + 14  # 2 spaces, version, 2 CRLF
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        return size

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        size = self._parsed_head_bytes()
        # this read's share of the head: all of it, or what earlier reads had not brought
        self._read_used += size if self._began_in_read else max(0, size - self._head_bytes)
        assert self.max_header_bytes is not None
        if size > self.max_header_bytes:
            self._refuse(431, reason="head_too_large")
            self.headers = []  # nor may a header in it start a protocol switch
            return
        unanswered = self._unanswered
        while unanswered and unanswered[0].response_complete:
            unanswered.popleft()
        if len(unanswered) >= MAX_PIPELINED:
            self._refuse(None, f"more than {MAX_PIPELINED} pipelined requests", "pipelining")
            return
        self._in_head = False
        self._disarm()
        limit = self.limit_concurrency  # uvicorn answers 503 itself, past MAX_CONNECTIONS
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            if self._is_probe():
                # the probes of Kubernetes, KServe and HAProxy are answered past the limit: a
                # client holding MAX_CONNECTIONS idle connections failed them, so the replica
                # left the load balancer and was restarted, the requests in flight lost with it
                self.limit_concurrency = None
            else:
                # answered by the app's middleware (server.middleware), not uvicorn's plain-text
                # 503: the API's JSON error, an X-Request-ID, Retry-After, the connection closed
                self._count("connection_limit")
                self.scope["state"][OVER_CONNECTIONS] = True
                self.limit_concurrency = None
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = limit
        cycle = self.cycle
        unanswered.append(cycle)
        self._receiving = cycle
        self._bodiless_bytes = 0
        cycle.transport = _CycleTransport(cycle.transport, self, cycle)
        if cycle.keep_alive:
            cycle.keep_alive = False  # until on_message_complete: an early answer closes
            self._close_unless_whole = cycle

    def _is_probe(self) -> bool:
        """A health probe (PROBE_PATHS, GET or HEAD): it reads no body and does no work."""
        path = self.url.split(b"?", 1)[0]
        return path in _PROBE_TARGETS and self.parser.get_method() in (b"GET", b"HEAD")

    def on_body(self, body: bytes) -> None:
        size = len(body)
        self._read_used += size
        self._body_in_read = True
        if self._refused or self._pieces < 0:  # closing, or this body was refused
            return
        self._pieces += 1
        self._piece_bytes += size
        pieces = self._pieces
        if pieces > MAX_SMALL_PIECES and self._piece_bytes < MIN_PIECE_BYTES * pieces:
            self._refuse_fragmented()
            return
        super().on_body(body)

    def _refuse_fragmented(self) -> None:
        """The app's next receive() raises the request's 400 (server.middleware); the rest of
        the body is not read, and the connection closes once the answer is sent."""
        self._pieces = -1
        self._count("fragmented_body")
        cycle = self.cycle
        cycle.scope["state"][FRAGMENTED_BODY] = True
        cycle.more_body = False
        cycle.keep_alive = False
        self._close_unless_whole = None
        cycle.message_event.set()
        self.flow.pause_reading()

    def on_message_complete(self) -> None:
        self._receiving = None
        if not self._refused:
            whole, self._close_unless_whole = self._close_unless_whole, None
            if whole is not None and not whole.response_started:
                whole.keep_alive = True  # its body is whole before its answer began
            super().on_message_complete()
            if self._pieces >= 0:
                # uvicorn stops reading once 64 KB of a body wait for the app, and reads again
                # only after the answer: a client that hung up meanwhile went unseen, and a long
                # batch ran on for nobody. Reading on sees the hang-up (connection_lost:
                # ON_CLIENT_GONE); the head of a pipelined request pauses reading again.
                self.flow.resume_reading()

    def shutdown(self) -> None:
        self._close_unless_whole = None  # uvicorn's shutdown ends the connection after it
        super().shutdown()

    def on_response_complete(self) -> None:
        # A request answered before its body arrived whole (an early 413 or 415, or a route
        # that reads no body): the connection takes no other request (RFC 9112, 9.6). It ends
        # its side once the answer is out, then lingers: what the client still sends is read
        # and dropped until uvicorn's keep-alive timer, armed below for KEEP_ALIVE_TIMEOUT_S but
        # at most LINGER_S (a keep-alive raised above a proxy's idle timeout is no reason to
        # keep a refused upload's connection longer), closes it. Closing at once would make the
        # kernel answer the unread bytes with a reset, and a client still sending an oversized
        # upload lost its 413 to it. uvicorn itself
        # read on and dropped the rest with no limit: every read cancelled that timer, so a
        # client sending a byte now and then held the connection, and a MAX_CONNECTIONS slot,
        # for good. (An earlier pipelined request's answer leaves the connection as it is: the
        # one whose body is arriving is not answered yet.)
        receiving = self._receiving
        linger = receiving is not None and receiving.response_complete
        if linger:
            self._receiving = None
            self._lingering = True
            transport = self.transport
            if transport is not None and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()  # after what is written: the answer goes out first
        super().on_response_complete()
        timer = self.timeout_keep_alive_task
        if linger and timer is not None and self.timeout_keep_alive > LINGER_S:
            timer.cancel()
            self.timeout_keep_alive_task = self.loop.call_later(
                LINGER_S, self.timeout_keep_alive_handler
            )

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's hook (hence the name): it logs two warnings for every request that asks to
        # switch protocols (to websocket or h2c), the second telling the operator to install a
        # WebSocket library. This server speaks HTTP/1.1 only, by design: such a request gets
        # its plain HTTP/1.1 answer (RFC 9110 lets a server ignore the request to switch), and
        # any client could fill the log with that advice.
        log.debug("a request to switch protocols was ignored")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused, in the API's shape: a JSON error with
        an ``X-Request-ID`` (uvicorn's was plain text, the one answer without an id), whose
        message gives the parser's reason ("Duplicate Content-Length", "Invalid character in
        Content-Length", ...). uvicorn calls this in its ``except HttpParserError`` block, so
        the error is the one being handled; a failed callback of ours is a server fault, never
        described to the client."""
        self._count("malformed")  # uvicorn's parser refused the bytes: not HTTP
        code, message = _REFUSALS[400]
        exc = sys.exc_info()[1]
        if isinstance(exc, httptools.HttpParserError) and not isinstance(
            exc, httptools.HttpParserCallbackError
        ):
            why = "".join(c for c in str(exc)[:120] if " " <= c <= "~")
            message = f"{message}: {why}" if why else message
        self._in_head = False
        self._refused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._refusal(400, code, message))
            self.transport.close()

    def _refusal(self, status: int, code: str, message: str) -> bytes:
        """A whole answer made here, before any request reached the app (no cycle): the API's
        JSON error, uvicorn's default headers (Date), a fresh ``X-Request-ID``, and
        ``connection: close``."""
        path = self.url.split(b"?", 1)[0].decode("latin-1") if self.url else ""
        body = json.dumps(error_body(path, code, message)).encode()
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        for name, value in self.server_state.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        parts.append(
            b"content-type: application/json\r\ncontent-length: %d\r\n%s: %s\r\n"
            b"connection: close\r\n\r\n" % (len(body), REQUEST_ID_HEADER, new_id().encode())
        )
        return b"".join(parts) + body

    def _count(self, reason: str) -> None:
        count = self.app_state.get(REFUSAL_COUNTER)  # the lifespan's, once it has started
        if count is not None:
            count(reason)

    def _refuse(self, status: int | None, why: str = "", reason: str = "") -> None:
        """Close the connection, saying why first when ``status`` is given and no earlier
        request of it still waits for its answer (answers go out in request order).
        ``reason``: the refusal counted (server.metrics.REFUSALS); none for a quiet close."""
        if self.transport is None or self.transport.is_closing():
            return
        if reason:
            self._count(reason)
        self._in_head = False
        self._refused = True
        reason = why or (_REASONS[status].decode() if status is not None else "")
        if reason:
            fields = {"status": status, "reason": reason}
            log.info("closing a connection: %s", reason, extra={"fields": fields})
        waiting = any(not cycle.response_complete for cycle in self._unanswered)
        if status is not None and not waiting:
            self.transport.write(self._refusal(status, *_REFUSALS[status]))
        self.transport.close()
