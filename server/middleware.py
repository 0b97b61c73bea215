"""Per-request context: request id, metrics, one JSON log line, and the last-resort 500.

A plain ASGI middleware (not ``BaseHTTPMiddleware``, which costs a task and a stream per
request). It sits inside Starlette's error middleware, so it also answers unexpected
exceptions itself: with the API's error shape and the request id, never a trace.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import socket
import time
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import RETRY_SOON, ApiError, error_body, shutting_down
from server.ids import is_valid_id_bytes, new_id
from server.metrics import UNMATCHED_ROUTE, ServerMetrics, method_label

access_log = logging.getLogger("server.access")
error_log = logging.getLogger("server.error")

REQUEST_ID_HEADER = b"x-request-id"
# the orchestrator's health probes: answered whatever the Host and past MAX_CONNECTIONS
# (server.protocol); kubelet's carry the pod's address, HAProxy's none
PROBE_PATHS = frozenset(
    ("/health", "/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready")
)
# what a loopback connection's Host may name (ALLOWED_HOSTS unset): a web page whose own name
# was made to resolve to 127.0.0.1 (DNS rebinding) reaches a local server under that name
# (and the wildcard addresses a server bound to every interface prints, and this machine's own
# name, which Debian resolves to 127.0.1.1: names no attacker's page can have)
LOOPBACK_HOSTS = frozenset(
    ("localhost", "127.0.0.1", "[::1]", "0.0.0.0", "[::]", socket.gethostname().lower())
)
_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
# the answer to a request the server treated as evaluation traffic (kept out of monitoring)
_EVALUATION_HEADER = (b"x-traffic-class", b"evaluation")
# set in the scope's state by the connection's protocol (server.protocol) when the client hung
# up before the request's answer was complete: the answer went nowhere
CLIENT_GONE = "client_gone"
# ... and, while a prediction request waits for its images' work, what the protocol calls when
# its client hangs up (server.service: the work not yet started is dropped)
ON_CLIENT_GONE = "on_client_gone"
# ... and when the body arrives in pieces too small to be worth their cost (server.protocol): the
# next receive() raises this request's 400, so it is answered like any bad request
FRAGMENTED_BODY = "fragmented_body"
# scope state: the request came past MAX_CONNECTIONS (server.protocol), and is answered 503 here
OVER_CONNECTIONS = "over_connections"
FRAGMENTED_MESSAGE = "the body arrived in pieces of a few bytes each; send it in larger chunks"


def route_template(scope: Scope) -> str:
    """The matched route's path template; every unmatched path shares one label."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            # A client id is echoed only if it is short and plain: it ends up in logs and headers.
            # Whitespace around a field value is not part of it (RFC 9110, 5.5); the parser
            # leaves the trailing part, so "abc " was replaced by a new id, " abc" kept as "abc"
            value = value.rstrip(b" \t")
            if is_valid_id_bytes(value):
                return value.decode("ascii")
            break
    return new_id()


def _host_name(value: bytes | str) -> str:
    """The name of a Host header's value, lower case, without its port or a final dot."""
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip().lower()
    if text.startswith("["):  # [::1]:8000
        return text[: text.find("]") + 1]
    return text.partition(":")[0].removesuffix(".")


@functools.lru_cache(maxsize=64)
def _is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped address (an IPv4 client of a server bound
    to ::)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:  # a Unix socket's path
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    """Whether ``origin`` (scheme://host[:port]) is ``host`` (host[:port]), default ports
    alike: browsers leave them out of both, other clients may not."""
    if host is None:
        return False
    scheme, _, netloc = origin.decode("latin-1").strip().lower().partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    named = host.decode("latin-1").strip().lower()
    return bool(netloc) and netloc.removesuffix(default) == named.removesuffix(default)


def _too_many_connections() -> ApiError:
    """The answer past MAX_CONNECTIONS: come back soon, on a new connection."""
    return ApiError(
        503,
        "too_many_connections",
        "the server holds as many connections as it takes (MAX_CONNECTIONS)",
        {**RETRY_SOON, "Connection": "close"},
    )


def refusal(scope: Scope, hosts: frozenset[str] | None) -> ApiError | None:
    """Why a request is refused before the app sees it, or None.

    - ``Host``: with ``hosts`` (ALLOWED_HOSTS) it must name one of them; unset, a connection
      that arrived on a loopback address must name the loopback (``LOOPBACK_HOSTS``). A server
      bound to 0.0.0.0 in a container sees Service and pod names on other addresses: any.
    - ``Origin`` on a request that writes (POST): another site's page may send one (a form
      needs no CORS preflight), so a browser's request from a page not served here is refused.
      Service clients send no Origin; the web page's own requests name this server: its Host,
      or a name ALLOWED_HOSTS lists (behind a proxy that rewrites Host, the public name).
    The health probes pass whatever they name."""
    host = origin = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"origin":
            origin = value
    listed = hosts
    if hosts is None:
        server = scope.get("server")
        if server and _is_loopback(server[0]):
            hosts = LOOPBACK_HOSTS
    if hosts is not None and "*" not in hosts:
        probe = scope["method"] in ("GET", "HEAD") and scope["path"] in PROBE_PATHS
        if not probe and (host is None or _host_name(host) not in hosts):
            return ApiError(
                400, "invalid_host", "the Host header names no host this server answers for"
            )
    if origin is not None and scope["method"] not in _SAFE_METHODS:
        named = _host_name(origin.partition(b"://")[2])
        if not _same_origin(origin, host) and (listed is None or named not in listed):
            return ApiError(
                403,
                "cross_origin",
                "requests from another site's page are refused: the Origin is not this server",
            )
    return None


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: ServerMetrics, hosts: frozenset[str] | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.hosts = hosts  # ALLOWED_HOSTS (settings.host_names); None: the loopback rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = message.get("headers", ())
                if 300 <= status < 400:  # Starlette's slash redirects name the client's Host
                    headers = [_path_only(h) for h in headers]
                message["headers"] = [*headers, header]
                if "traffic" in state:  # server.service.is_evaluation: honoured, and said so
                    message["headers"].append(_EVALUATION_HEADER)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                state["sent_at"] = time.perf_counter()

        async def receive_checked() -> Message:
            message = await receive()
            if FRAGMENTED_BODY in state:
                raise ApiError(400, FRAGMENTED_BODY, FRAGMENTED_MESSAGE)
            return message

        self.metrics.in_flight.inc()
        try:
            refused = _too_many_connections() if OVER_CONNECTIONS in state else None
            refused = refused or refusal(scope, self.hosts)
            if refused is not None:
                status = refused.status
                body = json.dumps(error_body(scope["path"], refused.code, refused.message))
                await _send_json(send_with_id, status, body.encode(), refused.headers)
                return
            await self.app(scope, receive_checked, send_with_id)
            if state.get(CLIENT_GONE) and status < 500:
                status = 499  # answered, but the client had hung up: the answer was dropped
        except ClientDisconnect:
            status = 499  # the client went away mid-request: nothing to answer, nothing broke
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's task: at GRACEFUL_TIMEOUT_S into a shutdown, for
            # the requests still running (a body still arriving, a long batch). Left to uvicorn,
            # that is a traceback and a plain-text 500, a server fault on every dashboard; it
            # is the documented 503 shutting_down, and the task ends (nothing else awaits it).
            error_log.warning(
                "request cut off by the graceful shutdown's timeout",
                extra={"fields": {"request_id": request_id}},
            )
            if not response_started:
                stopping = shutting_down()
                status = stopping.status
                body = error_body(scope["path"], stopping.code, stopping.message)
                headers = {**(stopping.headers or {}), "Connection": "close"}
                await _send_json(send_with_id, status, json.dumps(body).encode(), headers)
        except Exception:
            status = 500
            error_log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not response_started:
                body = error_body(scope["path"], "internal_error", _MESSAGE)
                await _send_json(send_with_id, 500, json.dumps(body).encode())
        finally:
            self.metrics.in_flight.dec()
            done = time.perf_counter()
            elapsed = done - started
            route = route_template(scope)
            self.metrics.request_series(route, method_label(scope["method"]), str(status)).inc()
            self.metrics.latency_series(route).observe(elapsed)
            if "handled_at" in state:  # a prediction: where its time went around the model
                stages = self.metrics.stages
                stages["head"].observe(started - state.get("received_at", started))
                stages["respond"].observe(state.get("sent_at", done) - state["handled_at"])
            if access_log.isEnabledFor(logging.INFO):
                fields = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 3),
                }
                if "label" in state:
                    fields["label"] = state["label"]
                    fields["confidence"] = round(state["confidence"], 6)
                if "images" in state:
                    fields["images"] = state["images"]
                if "traffic" in state:
                    fields["traffic"] = state["traffic"]
                access_log.info("request", extra={"fields": fields})
            if "handled_at" in state:
                self.metrics.stages["log"].observe(time.perf_counter() - done)


def _path_only(header: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """A Location header made relative: a redirect to this server needs no host, and one built
    from the request's Host header would send a client (or a shared cache) wherever that
    header pointed."""
    name, value = header
    if name.lower() != b"location":
        return header
    parts = urlsplit(value)
    if not parts.scheme and not parts.netloc:
        return header
    return name, urlunsplit((b"", b"", parts.path or b"/", parts.query, parts.fragment))


_MESSAGE = "an unexpected error occurred"


async def _send_json(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
