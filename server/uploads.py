"""Request bodies read under limits, in memory, counted as they arrive.

An oversized body is refused as soon as it is known to be too big: at once from its
Content-Length, or at the chunk that crosses the limit, never after reading it whole. Every byte
held is reserved from the server-wide byte budget (``server.limits``) as it arrives, so many
large bodies at once get 503 instead of growing memory. A Content-Length alone reserves nothing:
a few connections declaring 64 MB and sending nothing would otherwise hold the whole budget, and
every other upload got 503, until their body deadline. Multipart parts are collected in memory by
python-multipart's streaming parser (Starlette's form parser would spool files over 1 MiB to
disk; uploads never touch the disk here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from server.errors import RETRY_SOON, ApiError
from server.limits import OverBudgetError, Reservation

MULTIPART = "multipart/form-data"
_MAX_PART_HEADER_BYTES = 8 * 1024
# RFC 2046: 1 to 70 characters from a small alphabet; anything else is refused up front.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


class Body:
    """Bytes as they arrived, in pieces, joined once by whoever needs them whole.

    Joining a 10 MB upload holds the GIL for milliseconds; the pieces travel to the decode
    threads and are joined there, so the event loop never does it.
    """

    __slots__ = ("_pieces", "size")

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self._pieces = pieces
        self.size = sum(len(p) for p in pieces)

    def __len__(self) -> int:
        return self.size

    @property
    def joined(self) -> bool:
        """Whether ``join`` returns the bytes as they are, without a copy of them all."""
        return len(self._pieces) == 1 and isinstance(self._pieces[0], bytes)

    def join(self) -> bytes:
        if not self.joined:
            self._pieces = [b"".join(self._pieces)]
        return self._pieces[0]


def as_bytes(data: bytes | Body) -> bytes:
    return data.join() if isinstance(data, Body) else data


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")


def overloaded(exc: OverBudgetError) -> ApiError:
    return ApiError(503, "overloaded", f"{exc}; retry shortly", RETRY_SOON)


def content_length(request: Request) -> int | None:
    """The declared body size, or None; a malformed value is a 400, never a 500."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ApiError(400, "bad_content_length", "the Content-Length header is not a number")
    return int(value)


def check_identity_encoding(request: Request) -> None:
    """A body sent with a content coding (gzip, deflate, ...) is a 415 before any of it is read.

    No route decodes one: read as it is, a compressed body would fail later as bad JSON, a bad
    form or a bad image, naming the wrong cause. The answer says which coding is accepted
    (RFC 7694: Accept-Encoding on a 415)."""
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding and coding != "identity":
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"request bodies are read uncompressed; Content-Encoding {coding[:40]!r} is not"
            " supported",
            {"Accept-Encoding": "identity"},
        )
    # the same for a transfer coding besides chunked (gzip, chunked): the parser undoes the
    # chunks only, so a gzipped photo was read as its compressed bytes (422 not_an_image)
    transfer = request.headers.get("transfer-encoding", "").lower()
    if any(c.strip() not in ("chunked", "") for c in transfer.split(",")):
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"request bodies are read uncompressed; Transfer-Encoding {transfer[:40]!r} is not"
            " supported (chunked is)",
            {"Accept-Encoding": "identity"},
        )


def _check_declared(request: Request, limit: int) -> None:
    """A content coding is a 415 and a Content-Length over ``limit`` a 413, before any of the
    body is read."""
    check_identity_encoding(request)
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise _too_large(limit)


def reserve(reservation: Reservation, n: int) -> None:
    """``n`` more bytes from the byte budget, or the request's 503; a 413 when the request
    alone needs more than the whole budget (a V2 body counts twice): a 503 asks for a retry
    that could never succeed."""
    try:
        reservation.grow(n)
    except OverBudgetError as exc:
        limit = reservation.budget.limit
        if reservation.held + n > limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"the request needs more than the {limit} bytes this server holds for all "
                "requests at once (MAX_INFLIGHT_BYTES; a V2 body counts twice); send a smaller one",
            ) from None
        raise overloaded(exc) from None


def _count(size: int, held: int, limit: int, reservation: Reservation | None) -> int:
    """Account for a body that has grown to ``size`` bytes; returns the bytes now held."""
    if size > limit:
        raise _too_large(limit)
    if size > held and reservation is not None:
        reserve(reservation, size - held)
        return size
    return max(held, size)


async def read_body(request: Request, limit: int, reservation: Reservation | None = None) -> Body:
    """The whole body, at most ``limit`` bytes, reserved from the byte budget as it arrives."""
    _check_declared(request, limit)
    held = 0
    chunks: list[bytes | memoryview] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        held = _count(size, held, limit, reservation)
        if chunk:
            chunks.append(chunk)
    return Body(chunks)


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    # views into the body's chunks: no copy while parsing (joined later, off the event loop)
    chunks: list[memoryview | bytes] = field(default_factory=list)
    size: int = 0

    @property
    def data(self) -> Body:
        return Body(self.chunks)


class _Collector:
    """python-multipart callbacks: keeps the parts named ``field``, enforcing the limits."""

    def __init__(self, field_name: str, max_parts: int, max_part_bytes: int) -> None:
        self.field_name = field_name
        self.max_parts = max_parts
        self.max_part_bytes = max_part_bytes
        self.parts: list[Part] = []
        self.seen_parts = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = b""
        self._value = b""
        self._header_bytes = 0
        self._current: Part | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.seen_parts += 1
        # Other fields are ignored, but a flood of them is refused like a flood of files.
        if self.seen_parts > self.max_parts + 16:
            raise ApiError(413, "too_many_parts", "the form has too many parts")
        self._headers = []
        self._header_bytes = 0
        self._current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._count_header(end - start)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > _MAX_PART_HEADER_BYTES:
            raise ApiError(400, "bad_multipart", "a form part has oversized headers")

    def on_header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = b""
        self._value = b""

    def on_headers_finished(self) -> None:
        headers = dict(self._headers)
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if name != self.field_name:
            return
        if len(self.parts) >= self.max_parts:
            raise ApiError(
                413,
                "too_many_files",
                f"more than {self.max_parts} {self.field_name!r} parts in one request",
            )
        filename = options.get(b"filename")
        content_type = headers.get(b"content-type", b"application/octet-stream")
        self._current = Part(
            name=name,
            filename=filename.decode("utf-8", "replace") if filename is not None else None,
            content_type=content_type.decode("latin-1"),
        )
        self.parts.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None:
            return
        part.size += end - start
        if part.size > self.max_part_bytes:
            label = part.filename or part.name
            raise ApiError(
                413, "file_too_large", f"{label!r} is larger than {self.max_part_bytes} bytes"
            )
        part.chunks.append(memoryview(data)[start:end])


async def read_multipart(
    request: Request,
    *,
    field_name: str,
    max_parts: int,
    max_part_bytes: int,
    max_body_bytes: int,
    reservation: Reservation | None = None,
) -> list[Part]:
    """The parts named ``field_name`` of a multipart/form-data body, in order."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "the multipart Content-Type has no boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise ApiError(
            400, "bad_multipart", "the multipart boundary must be 1 to 70 plain characters"
        )
    _check_declared(request, max_body_bytes)
    held = 0
    collector = _Collector(field_name, max_parts, max_part_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        held = _count(size, held, max_body_bytes, reservation)
        _feed(parser, chunk)
    _feed(parser, None)
    if parser.state != MultipartState.END:  # python-multipart's finalize() does not check it
        raise ApiError(400, "bad_multipart", "the multipart body ends before its closing boundary")
    return collector.parts


def _feed(parser: MultipartParser, chunk: bytes | None) -> None:
    """One step of the parser (None finalizes); its errors on client bytes are a 400."""
    try:
        if chunk is None:
            parser.finalize()
        else:
            parser.write(chunk)
    except ApiError:
        raise
    except Exception:  # python-multipart raises several kinds on malformed input
        raise ApiError(400, "bad_multipart", "the multipart body is malformed") from None
