"""Server-wide budgets: request bytes held in memory and image pixels being decoded.

Each request's body reserves bytes as its chunks arrive and each image reserves its pixels
just before it is decoded; both are released when the work is done. Past a budget the request
(or, in a batch, that image) is refused with 503 and ``Retry-After`` instead of growing memory,
so peak memory stays bounded whatever mix of uploads arrives at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class OverBudgetError(RuntimeError):
    """A server-wide budget is exhausted: the caller answers 503 with ``Retry-After``."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the server is at its limit of {what} in flight")
        self.what = what


class Budget:
    """A thread-safe counter with a ceiling (bytes on the event loop, pixels on decode threads)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.used = 0
        self._lock = threading.Lock()

    def try_reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def reserve_or_raise(self, n: int) -> None:
        if not self.try_reserve(n):
            raise OverBudgetError(self.what)

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        """Reserve ``n`` for the duration of the block, or raise :class:`OverBudgetError`."""
        self.reserve_or_raise(n)
        try:
            yield
        finally:
            self.release(n)


class Reservation:
    """What one request holds of a :class:`Budget`; released once, whatever happened."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0

    def grow(self, n: int) -> None:
        self.budget.reserve_or_raise(n)
        self.held += n

    def release(self) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0
