"""Encoding a multipart/form-data body of files (standard library only).

The load generator and the hostile-client tests build requests byte by byte on raw sockets, so
they need the body itself rather than an HTTP client's encoder.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence


def multipart_body(
    field: str,
    files: Sequence[tuple[str, bytes]],
    *,
    content_type: str = "application/octet-stream",
) -> tuple[bytes, str]:
    """(body, Content-Type header) with one ``field`` part per (filename, data), in order."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
        + data
        + b"\r\n"
        for filename, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
