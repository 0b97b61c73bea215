"""Server configuration: one frozen dataclass, every field an environment variable.

``Settings.from_env()`` reads and validates the environment once at start-up; a bad value fails
at once with an error that names the variable, never later inside a request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from server.preprocessing import DEFAULT_MAX_PIXELS

MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a missing or wrong value; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    # The field name in upper case is the environment variable (model_path -> MODEL_PATH).
    model_path: str = "models/model.onnx"
    model_uri: str = ""  # e.g. models:/catsdogs@champion; when set it wins over model_path
    mlflow_tracking_uri: str = ""  # where MODEL_URI is resolved; empty = MLflow's default
    model_cache_dir: str = "var/models"  # where a resolved MODEL_URI is downloaded to
    served_model_name: str = "catsdogs"  # the name of the model in the V2 protocol's URLs
    host: str = "127.0.0.1"
    port: int = 8000
    intra_op_threads: int = 0  # 0 = the CPUs this process may really use
    decode_threads: int = 0  # 0 = the CPUs this process may really use
    # 0: onnxruntime's pool threads sleep when idle, leaving the cores to decoding and HTTP;
    # 1: they spin-wait for work (measured here: slower whenever anything else needs a core).
    intra_op_spinning: int = 0
    # Images per batch; 1 disables dynamic batching. On 2 cores EfficientNet-Lite0 gains
    # nothing per image beyond 4 and measured slower at 8.
    max_batch_size: int = 4
    max_queue_delay_ms: float = 2.0  # longest wait for a batch to fill while requests arrive
    max_queue_size: int = 64  # images admitted and not yet answered; beyond -> 503
    request_timeout_s: float = 30.0  # per-request deadline -> 504
    max_upload_bytes: int = 10 * MIB  # one image
    max_request_bytes: int = 64 * MIB  # a whole batch or V2 request body
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    max_batch_files: int = 32  # images in one batch request
    graceful_timeout_s: float = 10.0  # SIGTERM: time in-flight requests get to finish
    log_level: str = "info"
    prediction_log_path: str = "var/predictions.db"
    drift_window: int = 500

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.name.upper()
            if name in env:
                values[f.name] = _parse(name, env[name], _PARSERS[f.name])
        return cls(**values)

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "intra_op_threads": self.intra_op_threads >= 0,
            "decode_threads": self.decode_threads >= 0,
            "intra_op_spinning": self.intra_op_spinning in (0, 1),
            "max_batch_size": self.max_batch_size >= 1,
            "max_queue_delay_ms": 0 <= self.max_queue_delay_ms <= 1000,
            "max_queue_size": self.max_queue_size >= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "max_upload_bytes": self.max_upload_bytes >= 1,
            "max_request_bytes": self.max_request_bytes >= self.max_upload_bytes,
            "max_pixels": self.max_pixels >= 64,
            "max_batch_files": self.max_batch_files >= 1,
            "graceful_timeout_s": self.graceful_timeout_s >= 0,
            "log_level": self.log_level.lower() in _LOG_LEVELS,
            "drift_window": self.drift_window >= 1,
            "served_model_name": bool(self.served_model_name)
            and all(c.isalnum() or c in "-_." for c in self.served_model_name),
            "model_path": bool(self.model_path or self.model_uri),
        }
        for key, ok in checks.items():
            if not ok:
                raise SettingsError(f"{key.upper()}: invalid value {getattr(self, key)!r}")

    @property
    def model_source(self) -> str:
        return self.model_uri or self.model_path


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _parse_int(text: str) -> int:
    return int(text.strip().replace("_", ""))


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    f.name: {"int": _parse_int, "float": _parse_float}.get(str(f.type), str)
    for f in fields(Settings)
}


def _parse(name: str, text: str, parser: Callable[[str], Any]) -> Any:
    try:
        return parser(text)
    except ValueError:
        kind = {_parse_int: "an integer", _parse_float: "a number"}.get(parser, "a string")
        raise SettingsError(f"{name}: expected {kind}, got {text!r}") from None


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask and cgroup quota, not the host's count.

    onnxruntime sizes its pools from the host's cores, which oversubscribes a container
    limited to fewer CPUs, so the server sizes them itself.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPU quota in CPUs from cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``; None = unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
