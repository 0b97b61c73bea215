"""Identifiers: the one rule every client-supplied id must follow, and server-made ids.

A client id (``X-Request-ID``, a feedback ``request_id`` or ``prediction_id``) ends up in logs,
headers and the prediction log, so it is accepted only when it is short and plain ASCII.
"""

from __future__ import annotations

import os
import re

ID_PATTERN = r"[A-Za-z0-9._:\-]{1,128}"
_ID = re.compile(ID_PATTERN)
_ID_BYTES = re.compile(ID_PATTERN.encode("ascii"))


def is_valid_id(value: object) -> bool:
    """True for a str that follows the id rule (what feedback and X-Request-ID accept)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_valid_id_bytes(value: bytes) -> bool:
    """The same rule on a raw header value."""
    return _ID_BYTES.fullmatch(value) is not None


def new_id() -> str:
    """A fresh server-made id: 32 hex digits, unique without coordination between replicas.

    128 random bits from the OS (what ``uuid4`` draws too, without building a UUID object:
    two ids per prediction are made on the event loop)."""
    return os.urandom(16).hex()
