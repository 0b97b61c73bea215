"""MLflow, best effort: training must finish even when no tracking server answers.

The tracking URI comes only from ``MLFLOW_TRACKING_URI`` (unset: MLflow's local default).
Every call goes through :class:`Tracker`, which logs a warning on the first failure and then
stops talking to MLflow for the rest of the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("training.run_tracking")

EXPERIMENT = "catsdogs"


class Tracker:
    def __init__(self) -> None:
        self.active = False
        self.run_id = ""
        self._mlflow: Any = None

    def start(self, run_name: str, tags: dict[str, str], experiment: str = EXPERIMENT) -> str:
        # An unreachable server should cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.active = True
            log.info("MLflow run %s at %s", self.run_id, mlflow.get_tracking_uri())
        except Exception as exc:  # any failure: warn and train without tracking
            log.warning("MLflow tracking unavailable, training goes on without it: %s", exc)
            self.active = False
        return self.run_id

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        """``mlflow.<name>(*args, **kwargs)`` if tracking still works."""
        if not self.active:
            return
        fn: Callable[..., Any] = getattr(self._mlflow, name)
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("MLflow %s failed, tracking disabled for this run: %s", name, exc)
            self.active = False

    @contextlib.contextmanager
    def ended_on_failure(self) -> Iterator[None]:
        """End the run ``KILLED`` when the block is stopped (Ctrl-C, or a SIGTERM the stage
        turned into ``SystemExit(143)``) and ``FAILED`` when it raises anything else: MLflow's
        own exit hook marked a crashed run FINISHED, and a SIGTERM left it RUNNING."""
        try:
            yield
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt) or (
                isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM
            )
            self.end("KILLED" if stopped else "FAILED")
            raise

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is None or not self.run_id:
            return
        try:
            self._mlflow.end_run(status=status)
        except Exception as exc:
            log.warning("MLflow end_run failed: %s", exc)
