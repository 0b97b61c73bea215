"""Server configuration: one frozen dataclass, every field an environment variable.

``Settings.from_env()`` reads and validates the environment once at start-up; a bad value fails
at once with an error that names the variable, never later inside a request.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from catsdogs.preprocessing import DEFAULT_MAX_PIXELS

MIB = 1024 * 1024
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a missing or wrong value; the message names the environment variable."""


def setting(default: T, description: str) -> T:
    """A field with its one-line description: ``--help`` and the README's table show it."""
    return field(default=default, metadata={"help": description})


@dataclass(frozen=True)
class Settings:
    # The field name in upper case is the environment variable (model_path -> MODEL_PATH).
    model_path: str = setting("models/model.onnx", "ONNX model file to serve")
    model_uri: str = setting(
        "",
        "registry model to serve instead of MODEL_PATH: models:/NAME@ALIAS or models:/NAME/VERSION",
    )
    mlflow_tracking_uri: str = setting(
        "", "MLflow tracking server (http://...) that resolves MODEL_URI"
    )
    model_cache_dir: str = setting(
        "var/models", "folder a model resolved from MODEL_URI is downloaded to"
    )
    model_max_bytes: int = setting(
        1024 * MIB,
        "largest model download accepted from the registry, bytes; the default model is ~50 MB",
    )
    # local sources are for tests and local development; see server/model_uri.py
    model_allow_local_source: int = setting(
        0, "1: a registry version whose source is a local path may be served; 0: proxied only"
    )
    served_model_name: str = setting("catsdogs", "the model's name in the V2 protocol's URLs")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(8000, "TCP port to listen on")
    allowed_hosts: str = setting(
        "",
        "Host names answered, comma-separated ('*': any); empty: loopback names on loopback "
        "connections",
    )
    intra_op_threads: int = setting(
        0, "onnxruntime threads per run; 0 = the CPUs this process may use"
    )
    decode_threads: int = setting(0, "threads decoding images; 0 = the CPUs this process may use")
    # the event loop answers health probes, admits and refuses; when the cores are saturated
    # it must not wait behind the threads doing the heavy work (docs/serving-internals.md,
    # "The heavy threads yield to the event loop")
    worker_nice: int = setting(
        10, "niceness added to the decode and model threads (not the event loop's); 0: none"
    )
    # spinning wins on a quiet machine and loses badly when another process wants the cores:
    # 2 measures both while serving and uses the faster (server/inference.py, PolicyChooser)
    intra_op_spinning: int = setting(
        2,
        "onnxruntime's pool threads between ops: 0 sleep, 1 spin (during runs), 2 the faster",
    )
    # while several requests are in the server, batches run side by side on one-thread sessions
    # (server/inference.py): on 2 cores about a fifth more images/s than one run on both cores
    parallel_runs: int = setting(
        0, "model runs at once under load, one core each; 1: one at a time; 0: the CPUs"
    )
    # the cap; ADAPTIVE_BATCH lowers the limit to where the measured time per image stops falling.
    # Each size up to the cap is warmed up: on 2 cores Lite0 ran no faster per image at 6-8 than
    # at 4, and their buffers cost about 50 MB of RSS, so the cap stays at 4.
    max_batch_size: int = setting(4, "most images per model run; 1 disables dynamic batching")
    adaptive_batch: int = setting(
        1, "1: batches stop at the size the warm-up measured fastest per image; 0: at the cap"
    )
    max_queue_delay_ms: float = setting(
        2.0, "longest wait for a batch to fill while requests arrive, ms"
    )
    max_queue_size: int = setting(64, "images admitted and not yet answered; beyond: 503")
    request_timeout_s: float = setting(30.0, "deadline of one request, s; beyond: 504")
    max_upload_bytes: int = setting(10 * MIB, "largest image file, bytes; beyond: 413")
    max_request_bytes: int = setting(
        64 * MIB, "largest request body (a batch or a V2 request), bytes; beyond: 413"
    )
    max_json_bytes: int = setting(
        8 * MIB, "largest JSON part of a V2 request (images in base64), bytes; beyond: 413"
    )
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "largest image, pixels, checked before decoding; beyond: 413"
    )
    max_batch_files: int = setting(32, "most images in one batch request; beyond: 413")
    graceful_timeout_s: float = setting(
        10.0, "on SIGTERM, how long requests in flight get to finish, s"
    )
    # behind a load balancer: long enough for its health checks to see the 503 (interval x fall)
    drain_delay_s: float = setting(
        0.0, "on SIGTERM, /health/ready answers 503 this long while requests are still served, s"
    )
    log_level: str = setting("info", "critical, error, warning, info or debug")
    prediction_log_path: str = setting(
        "var/predictions.db",
        "SQLite file of the prediction and feedback log, used while PREDICTION_LOG_URL is empty",
    )
    prediction_log_queue: int = setting(
        10_000, "predictions waiting for the log writer; beyond, new ones are dropped (counted)"
    )
    prediction_log_retention_days: float = setting(
        90.0, "predictions older than this many days are deleted; 0 keeps them forever"
    )
    prediction_log_max_rows: int = setting(
        0, "only the newest this many predictions are kept; 0 = no limit"
    )
    store_timeout_s: float = setting(
        5.0, "longest wait for the log writer (feedback), s; beyond: 503"
    )
    drift_window: int = setting(
        500, "recent predictions compared with the training reference for drift"
    )
    # a secret: never shown (repr, errors, --help, docs); no command-line flag either
    api_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "bearer token (16+ characters) for writes, evaluation traffic and "
            "shown paths; empty = no auth"
        },
    )
    # a secret as well: the token being replaced, accepted beside API_TOKEN while clients move
    api_token_previous: str = field(
        default="",
        repr=False,
        metadata={"help": "an older bearer token still accepted during a rotation; empty = none"},
    )
    # The shared store (README: Running at scale). A secret too: a PostgreSQL URL may carry a
    # password, so it is read from the environment only and never shown.
    prediction_log_url: str = field(
        default="",
        repr=False,
        metadata={
            "help": "log URL: sqlite:///PATH or postgresql://USER@HOST/DB (replicas share it); "
            "empty: PREDICTION_LOG_PATH"
        },
    )
    prediction_log_pool_size: int = setting(
        2, "PostgreSQL connections per process (the log writer and the figures refresher)"
    )
    prediction_log_refresh_s: float = setting(
        1.0, "PostgreSQL: how often live figures and drift are read again from the database, s"
    )
    prediction_log_reconnect_min_s: float = setting(
        0.1,
        "prediction log unreachable or locked: first wait before the writer retries, s (doubled)",
    )
    prediction_log_reconnect_max_s: float = setting(
        2.0, "prediction log unreachable: longest wait between the writer's retries, s"
    )
    max_inflight_bytes: int = setting(
        128 * MIB, "request bytes buffered across all requests in flight; beyond: 503"
    )
    max_inflight_pixels: int = setting(
        80_000_000, "decoded pixels across all requests in flight; beyond: 503"
    )
    # an image that does not fit waits for other decodes to release theirs, so a batch of large
    # images never competes with itself: long enough for a few of the largest (a 40 MP PNG
    # decodes in about 0.35 s on one core), far under REQUEST_TIMEOUT_S (server/limits.py)
    max_pixels_wait_ms: float = setting(
        2000.0, "longest wait of an image for room in MAX_INFLIGHT_PIXELS, ms; beyond: 503"
    )
    max_header_bytes: int = setting(
        32 * 1024, "largest request head (request line and headers), bytes; beyond: 431"
    )
    header_timeout_s: float = setting(
        10.0, "deadline for a request's head to arrive, s; beyond: 408"
    )
    body_timeout_s: float = setting(30.0, "deadline for a request's body to arrive, s; beyond: 408")
    keep_alive_timeout_s: float = setting(
        5.0, "an idle keep-alive connection is closed after this, s"
    )
    max_connections: int = setting(
        4096, "open connections; beyond, new requests get 503 (health probes are still answered)"
    )

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
            "model_max_bytes": self.model_max_bytes >= 1,
            "model_allow_local_source": self.model_allow_local_source in (0, 1),
            "intra_op_threads": self.intra_op_threads >= 0,
            "decode_threads": self.decode_threads >= 0,
            "worker_nice": 0 <= self.worker_nice <= 19,
            "intra_op_spinning": self.intra_op_spinning in (0, 1, 2),
            "adaptive_batch": self.adaptive_batch in (0, 1),
            "parallel_runs": self.parallel_runs >= 0,
            "max_batch_size": self.max_batch_size >= 1,
            "max_queue_delay_ms": 0 <= self.max_queue_delay_ms <= 1000,
            "max_queue_size": self.max_queue_size >= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "max_upload_bytes": self.max_upload_bytes >= 1,
            "max_request_bytes": self.max_request_bytes >= self.max_upload_bytes,
            "max_json_bytes": 1024 <= self.max_json_bytes <= self.max_request_bytes,
            "max_pixels": self.max_pixels >= 64,
            "max_batch_files": self.max_batch_files >= 1,
            "graceful_timeout_s": self.graceful_timeout_s >= 0,
            "drain_delay_s": 0 <= self.drain_delay_s <= 600,
            "log_level": self.log_level.lower() in _LOG_LEVELS,
            "drift_window": self.drift_window >= 1,
            "prediction_log_queue": self.prediction_log_queue >= 1,
            "prediction_log_retention_days": self.prediction_log_retention_days >= 0,
            "prediction_log_max_rows": self.prediction_log_max_rows >= 0,
            "store_timeout_s": self.store_timeout_s > 0,
            "prediction_log_url": _store_url_ok(self.prediction_log_url),
            "prediction_log_pool_size": 1 <= self.prediction_log_pool_size <= 100,
            "prediction_log_refresh_s": 0 < self.prediction_log_refresh_s <= 3600,
            "prediction_log_reconnect_min_s": 0 < self.prediction_log_reconnect_min_s <= 60,
            "prediction_log_reconnect_max_s": self.prediction_log_reconnect_min_s
            <= self.prediction_log_reconnect_max_s
            <= 60,
            "api_token": _token_ok(self.api_token),
            "api_token_previous": _token_ok(self.api_token_previous)
            and (not self.api_token_previous or bool(self.api_token))
            and (not self.api_token_previous or self.api_token_previous != self.api_token),
            "max_inflight_bytes": self.max_inflight_bytes >= self.max_request_bytes,
            "max_inflight_pixels": self.max_inflight_pixels >= self.max_pixels,
            "max_pixels_wait_ms": 0 <= self.max_pixels_wait_ms <= 60_000,
            "max_header_bytes": self.max_header_bytes >= 1024,
            "header_timeout_s": self.header_timeout_s > 0,
            "body_timeout_s": self.body_timeout_s > 0,
            "keep_alive_timeout_s": self.keep_alive_timeout_s > 0,
            "max_connections": self.max_connections >= 1,
            "allowed_hosts": all(_HOST_NAME.fullmatch(h) for h in self.host_names or ()),
            "served_model_name": bool(self.served_model_name)
            and all(c.isalnum() or c in "-_." for c in self.served_model_name),
            "model_path": bool(self.model_path or self.model_uri),
        }
        for key in ("api_token", "api_token_previous"):
            token = getattr(self, key)
            if token in _EXAMPLE_TOKENS:  # a copied example: a token everyone knows
                raise SettingsError(
                    f"{key.upper()}: still the example's placeholder; set a long random token "
                    f"({_TOKEN_RECIPE})"
                )
            if token and len(token) < MIN_TOKEN_CHARS and _token_ok(token):
                # a short token is a guessable one: nothing limits how fast a client tries
                raise SettingsError(
                    f"{key.upper()}: shorter than {MIN_TOKEN_CHARS} characters; set a long "
                    f"random token ({_TOKEN_RECIPE})"
                )
        for key, ok in checks.items():
            if not ok:
                shown = "(hidden)" if key in _SECRETS else repr(getattr(self, key))
                raise SettingsError(f"{key.upper()}: invalid value {shown}")

    @property
    def prediction_log(self) -> tuple[str, str]:
        """("sqlite", path) or ("postgresql", url): PREDICTION_LOG_URL when set, else the SQLite
        file PREDICTION_LOG_PATH (the one rule; the path is ignored once a URL is set)."""
        url = self.prediction_log_url
        if not url:
            return "sqlite", self.prediction_log_path
        if url.startswith(_SQLITE_PREFIX):
            return "sqlite", url[len(_SQLITE_PREFIX) :]
        return "postgresql", url

    @property
    def host_names(self) -> frozenset[str] | None:
        """ALLOWED_HOSTS as lower-case names; None when unset (the loopback rule)."""
        if not self.allowed_hosts.strip():
            return None
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(","))

    @property
    def model_source(self) -> str:
        return self.model_uri or self.model_path


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_SECRETS = frozenset({"api_token", "api_token_previous", "prediction_log_url"})


# a Host header's name: a DNS name (compose's service names may hold '_'), an IPv4 address, a
# bracketed IPv6 address, or '*' (any)
_HOST_NAME = re.compile(r"\*|[a-z0-9_]([a-z0-9_.-]{0,252})|\[[0-9a-f:.]{2,45}\]")


# deploy/k8s/overlays/prod/secrets.env.example's value (tests/serve/test_settings.py reads it)
_EXAMPLE_TOKENS = frozenset(("replace-with-a-long-random-token",))
# The shortest bearer token the server starts with: 16 characters of token_urlsafe are 96 random
# bits; the recipe below makes 43 (256 bits).
MIN_TOKEN_CHARS = 16
_TOKEN_RECIPE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _token_ok(token: str) -> bool:
    """Printable ASCII without spaces (the whole header value after ``Bearer``)."""
    return all(33 <= ord(c) <= 126 for c in token)


# SQLAlchemy's spelling, as MLflow's: sqlite:///relative/path, sqlite:////absolute/path
_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def _store_url_ok(url: str) -> bool:
    """Empty, ``sqlite:///PATH`` or a ``postgresql://`` URL, on one line without spaces."""
    if not url:
        return True
    if any(c.isspace() or ord(c) < 32 for c in url):
        return False
    if url.startswith(_SQLITE_PREFIX):
        return len(url) > len(_SQLITE_PREFIX)
    return url.startswith(_POSTGRES_PREFIXES)


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
