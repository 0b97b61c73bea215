"""Server-wide budgets: request bytes held in memory and image pixels being decoded.

Each request's body reserves bytes as its chunks arrive and each image reserves its pixels
just before it is decoded; both are released when the work is done. Past a budget the request
(or, in a batch, that image) is refused with 503 and ``Retry-After`` instead of growing memory,
so peak memory stays bounded whatever mix of uploads arrives at once.

The byte budget refuses at once: it is reserved on the event loop, which must never wait. An
image's pixels are reserved on a decode thread, which may wait a bounded time
(``MAX_PIXELS_WAIT_MS``) for pixels other decodes are about to release: a batch of large images
sent to an idle server would otherwise compete with itself (its images decode side by side, and
those that find the budget held by the first ones would be refused, on every retry alike).
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
    """A thread-safe counter with a ceiling (bytes on the event loop, pixels on decode threads).

    A reservation that does not fit may wait, up to its own bound, for releases to make room
    (each release wakes the waiters, which check again). Waiting cannot deadlock as long as no
    holder waits for anything while it holds: every holder's work then ends, releasing what it
    holds, and a reservation larger than the whole ceiling is refused at once rather than
    waited for. The pixel budget's holders keep that rule: see ``server.service.prepare``.
    Waiters are not served in arrival order: a large image can be passed by smaller ones that
    fit sooner, until its bound runs out and it is refused like any other over budget.
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.used = 0
        self._freed = threading.Condition(threading.Lock())

    def try_reserve(self, n: int, wait_s: float = 0.0) -> bool:
        """Reserve ``n`` if it fits, waiting up to ``wait_s`` seconds for releases to make room;
        False when it still does not fit (at once when ``n`` exceeds the whole limit)."""
        with self._freed:
            if n > self.limit:
                return False

            def fits() -> bool:
                return self.used + n <= self.limit

            if not fits() and (wait_s <= 0 or not self._freed.wait_for(fits, wait_s)):
                return False
            self.used += n
            return True

    def reserve_or_raise(self, n: int, wait_s: float = 0.0) -> None:
        if not self.try_reserve(n, wait_s):
            raise OverBudgetError(self.what)

    def release(self, n: int) -> None:
        with self._freed:
            self.used -= n
            self._freed.notify_all()  # waiters of any size: each checks whether it fits now

    @contextlib.contextmanager
    def hold(self, n: int, wait_s: float = 0.0) -> Iterator[None]:
        """Reserve ``n`` for the duration of the block (waiting up to ``wait_s`` seconds for
        room), or raise :class:`OverBudgetError`."""
        self.reserve_or_raise(n, wait_s)
        try:
            yield
        finally:
            self.release(n)


class Reservation:
    """What one request holds of a :class:`Budget`; released once, whatever happened.

    It never waits: requests reserve their body's bytes on the event loop."""

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
