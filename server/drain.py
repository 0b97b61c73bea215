"""Leave a load balancer's rotation before closing the door: the drain delay.

Behind a balancer (HAProxy, a Kubernetes Service), a replica that stops accepting the moment it
gets SIGTERM fails the requests the balancer sends it before its next health check notices.
With ``DRAIN_DELAY_S`` > 0 the first SIGTERM (or SIGINT) only turns ``/health/ready`` to 503,
while every request is still served; the balancer's checks take the replica out, and after the
delay uvicorn's usual graceful shutdown runs (stop accepting, finish in-flight requests within
GRACEFUL_TIMEOUT_S, lifespan shutdown). A second signal skips what is left of the delay.

Set it to the balancer's check interval x fall count plus a margin (HAProxy ``inter 500ms fall
2``: 1.5 s). The default, 0, is today's behaviour for a single instance.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first exit signal starts a drain of ``drain_delay_s``."""

    def __init__(self, config: uvicorn.Config, app: Starlette, drain_delay_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_delay_s = drain_delay_s
        self._draining = False
        self._skip = threading.Event()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler (main thread, between bytecodes): set flags only, take no lock.
        self.app.state.stopping = True  # start-up, if still running, must not turn ready
        if self.drain_delay_s <= 0 or self.should_exit or self._draining:
            self._skip.set()  # a second signal: stop draining, shut down now
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.app.state.ready = False
        threading.Thread(target=self._drain, args=(sig,), name="drain", daemon=True).start()

    def _drain(self, sig: int) -> None:
        log.info(
            "draining: /health/ready answers 503, requests are still served",
            extra={"fields": {"drain_delay_s": self.drain_delay_s}},
        )
        if not self._skip.wait(self.drain_delay_s):
            # what uvicorn's handler does: remember the signal, ask the loop to exit
            super().handle_exit(sig, None)
