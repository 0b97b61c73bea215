"""Request bodies read under limits, in memory, counted as they arrive.

An oversized body is refused as soon as it is known to be too big: at once from its
Content-Length, or at the chunk that crosses the limit, never after reading it whole. Multipart
parts are collected in memory by python-multipart's streaming parser (Starlette's form parser
would spool files over 1 MiB to disk; uploads never touch the disk here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from server.errors import ApiError

MULTIPART = "multipart/form-data"
_MAX_PART_HEADER_BYTES = 8 * 1024


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")


def check_content_length(request: Request, limit: int) -> None:
    value = request.headers.get("content-length")
    if value is None:
        return
    if not value.isdigit():
        raise ApiError(400, "bad_content_length", "the Content-Length header is not a number")
    if int(value) > limit:
        raise _too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes."""
    check_content_length(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if chunk:
            chunks.append(chunk)
    # The common case is a single chunk: hand it over without a copy.
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    @property
    def data(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


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
        part.chunks.append(data[start:end])


async def read_multipart(
    request: Request,
    *,
    field_name: str,
    max_parts: int,
    max_part_bytes: int,
    max_body_bytes: int,
) -> list[Part]:
    """The parts named ``field_name`` of a multipart/form-data body, in order."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "the multipart Content-Type has no boundary")
    check_content_length(request, max_body_bytes)
    collector = _Collector(field_name, max_parts, max_part_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise _too_large(max_body_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise ApiError(400, "bad_multipart", "the multipart body is malformed") from None
    return collector.parts
