"""JSON log lines: one object per line, so log shippers need no parsing rules.

Everything the process reports goes through the JSON handler: records of the ``logging`` tree,
``warnings`` (``logging.captureWarnings``), and exceptions nobody caught, in the main thread, in
other threads and in finalizers (``sys.excepthook``, ``threading.excepthook``,
``sys.unraisablehook``). C libraries that write to file descriptor 2 themselves bypass all of
that: libtiff's error handler (Pillow silences libtiff's warnings while decoding, not its errors,
so a corrupt TIFF prints ``ZIPDecode: Decoding error ...``), onnxruntime's logger, the
interpreter's own fatal messages. ``capture_native_stderr`` points fd 2 at a pipe and wraps each
plain line it reads in a JSON object; ``python -m server`` calls it, a library never should.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import faulthandler
import json
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any

from server.threads import name_os_thread

_CONFIGURED = "_catsdogs_json"
_MAX_LINE = 64 * 1024  # a native "line" longer than this is cut into several records
_PIPE_BYTES = 1 << 20  # room for a burst of native output while the reader thread waits
_REPR_CHARS = 200  # an unraisable exception's object, as shown in its record
# Access lines waiting for the writer thread; past this (a stuck stderr) new ones are dropped
# and counted rather than held in memory or written on the event loop.
ACCESS_QUEUE_LINES = 10_000
ACCESS_LINGER_S = 0.05  # a line is written at most this long after its request (see AccessWriter)
ACCESS_LOGGER = "server.access"

log = logging.getLogger("server.exceptions")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # warnings.formatwarning ends its text with a newline; a record needs none
            "message": record.getMessage().rstrip("\n"),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            # The trace goes to the log only, never to a client.
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _FdWriter:
    """A text stream onto a file descriptor that writes each ``write()`` whole, under a lock.

    The JSON handler and the stderr pump both write here; a long record (a trace) is never
    split by the other's line.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        return len(text)

    def flush(self) -> None:
        pass  # nothing is buffered

    def fileno(self) -> int:
        return self._fd


_direct: _FdWriter | None = None  # the real stderr, once capture_native_stderr has run


def configure_logging(level: str) -> None:
    """Send the root logger's records to stderr as JSON lines, with the hooks; idempotent."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(getattr(h, _CONFIGURED, False) for h in root.handlers):
        return
    handler = logging.StreamHandler(_direct or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _CONFIGURED, True)
    root.addHandler(handler)
    # uvicorn's own loggers would print a second, plain-text copy of each line.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, OncePerInterval) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(OncePerInterval(CLIENT_DRIVEN_WARNINGS, REPEAT_INTERVAL_S))
    logging.getLogger("uvicorn.access").disabled = True
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> JSON
    _queue_access_log(handler)
    _install_exception_hooks()


# uvicorn's warnings for a single client's request that the app never sees (counted instead in
# http_refused_total): written once per interval with how many were held back, not per request,
# because these lines are written on the event loop and any client can make them by the thousand.
CLIENT_DRIVEN_WARNINGS = ("Invalid HTTP request received.",)
REPEAT_INTERVAL_S = 10.0


class OncePerInterval(logging.Filter):
    """Lets each of ``messages`` through at most once per ``interval_s``; the next one through
    carries ``repeats_held_back``, the count of those dropped since the last."""

    def __init__(self, messages: tuple[str, ...], interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = dict.fromkeys(messages, float("-inf"))
        self._held: dict[str, int] = dict.fromkeys(messages, 0)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        last = self._last.get(message) if isinstance(message, str) else None
        if last is None:
            return True
        now = time.monotonic()
        if now - last < self.interval_s:
            self._held[message] += 1
            return False
        self._last[message] = now
        if self._held[message]:
            held = {"repeats_held_back": self._held[message]}
            record.fields = {**getattr(record, "fields", {}), **held}
            self._held[message] = 0
        return True


class AccessWriter:
    """The thread that writes ``server.access`` lines, off the event loop.

    A record is appended to a bounded queue; the thread is woken only by the first record of an
    empty queue, then lets more gather for ``linger_s`` and writes them all in one write. Woken
    once per request, it cost about two thread switches and turns at the GIL per request, while
    the next request was being read and run; this way a busy server wakes it a few times a
    second. Past ``max_lines`` waiting (a stuck stderr) new lines are dropped and counted
    rather than held in memory or written on the event loop. ``stop`` writes what is queued.
    """

    def __init__(self, handler: logging.StreamHandler, max_lines: int, linger_s: float) -> None:
        self.handler = handler
        self.max_lines = max_lines
        self.linger_s = linger_s
        self.dropped = 0
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._cond = threading.Condition()
        self._idle = False  # the thread waits for a first record
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, record: logging.LogRecord) -> None:
        with self._cond:
            if len(self._records) >= self.max_lines:
                self.dropped += 1
                return
            self._records.append(record)
            if self._idle:
                self._idle = False
                self._cond.notify()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._write()  # whatever came in after the thread's last round

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                while not self._records and not self._stopping.is_set():
                    self._idle = True
                    self._cond.wait()
                self._idle = False
            if self._stopping.is_set():
                self._write()
                return
            self._stopping.wait(self.linger_s)  # let a burst gather (a stop ends the wait)
            self._write()

    def _write(self) -> None:
        with self._cond:
            records = list(self._records)
            self._records.clear()
        if not records:
            return
        lines = []
        for record in records:
            try:
                lines.append(self.handler.format(record) + "\n")
            except Exception:
                self.handler.handleError(record)
        with self.handler.lock or contextlib.nullcontext():
            try:
                self.handler.stream.write("".join(lines))
                self.handler.flush()
            except Exception:
                self.handler.handleError(records[0])


class _AccessHandler(logging.Handler):
    """Hands access records to the writer as they are: formatting and the write to stderr
    happen on its thread (access records carry plain values: nothing to freeze before the hop).
    """

    def __init__(self, writer: AccessWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self.writer.put(record)


_access_writer: AccessWriter | None = None


def access_lines_dropped() -> int:
    return _access_writer.dropped if _access_writer is not None else 0


def _queue_access_log(handler: logging.StreamHandler) -> None:
    """``server.access`` records go to the writer thread, which writes them with ``handler``'s
    formatter onto its stream (the same JSON lines, the same stream); other records stay
    synchronous, so a warning or an error is written before the code that logged it goes on."""
    global _access_writer
    _access_writer = AccessWriter(handler, ACCESS_QUEUE_LINES, ACCESS_LINGER_S)
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [_AccessHandler(_access_writer)]
    access.propagate = False
    _access_writer.start()
    atexit.register(_access_writer.stop)  # writes what is queued


# ---------------------------------------------------------------- exception hooks

# The hooks found at install time. Python's defaults print plain text, so they are replaced;
# a hook someone else installed (pytest's, which turns these into test failures) is still called
# after the record is logged.
_previous: dict[str, Any] = {}


def _install_exception_hooks() -> None:
    if _previous:
        return
    _previous.update(
        excepthook=sys.excepthook,
        threading=threading.excepthook,
        unraisable=sys.unraisablehook,
    )
    sys.excepthook = _uncaught
    threading.excepthook = _thread_exception
    sys.unraisablehook = _unraisable


def _chain(key: str, default: Any, *args: Any) -> None:
    previous = _previous.get(key)
    if previous is not None and previous is not default:
        previous(*args)


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    log.critical(
        "uncaught exception: %s",
        exc_type.__name__,
        exc_info=(exc_type, exc, tb),
        extra={"fields": {"thread": threading.current_thread().name, "exc_type": _name(exc_type)}},
    )
    _chain("excepthook", sys.__excepthook__, exc_type, exc, tb)


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # a thread ending itself this way is no error (same as Python's default hook)
    name = args.thread.name if args.thread is not None else "unknown"
    log.error(
        "exception in thread %s: %s",
        name,
        _name(args.exc_type),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"fields": {"thread": name, "exc_type": _name(args.exc_type)}},
    )
    _chain("threading", threading.__excepthook__, args)


def _unraisable(unraisable: Any) -> None:
    # Raised where nobody can catch it: __del__, a weakref callback, a generator's close.
    exc_type = unraisable.exc_type
    exc_info = None
    if exc_type is not None:
        exc_info = (exc_type, unraisable.exc_value, unraisable.exc_traceback)
    log.error(
        "%s: %s",
        unraisable.err_msg or "Exception ignored in",
        _safe_repr(unraisable.object),
        exc_info=exc_info,
        extra={
            "fields": {
                "thread": threading.current_thread().name,
                "exc_type": _name(exc_type) if exc_type is not None else None,
            }
        },
    )
    _chain("unraisable", sys.__unraisablehook__, unraisable)


def _name(exc_type: type[BaseException] | None) -> str:
    return getattr(exc_type, "__qualname__", str(exc_type))


def _safe_repr(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not break the report of another error
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= _REPR_CHARS else text[:_REPR_CHARS] + "..."


# ---------------------------------------------------------------- native stderr

_pump: threading.Thread | None = None


def capture_native_stderr() -> None:
    """Make every line written to fd 2 a JSON object, whoever writes it; idempotent.

    fd 2 becomes a pipe; a thread reads it and writes to the real stderr: JSON object lines as
    they are, any other line wrapped as ``{"level": "warning", "logger": "stderr", ...}``. The
    JSON handler writes to the real stderr directly, so normal records skip the detour. At exit
    fd 2 is restored and what is left in the pipe is drained. A fatal crash can lose the last
    native lines still in the pipe, so faulthandler (when enabled) writes to the real stderr.
    """
    global _direct, _pump
    if _pump is not None:
        return
    sys.stderr.flush()
    _direct = _FdWriter(os.dup(2))
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(AttributeError, OSError):
        import fcntl

        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    for handler in logging.getLogger().handlers:
        if getattr(handler, _CONFIGURED, False) and isinstance(handler, logging.StreamHandler):
            handler.setStream(_direct)  # type: ignore[arg-type]
    if faulthandler.is_enabled():
        faulthandler.enable(file=_direct)  # type: ignore[arg-type]
    _pump = threading.Thread(
        target=_pump_lines, args=(read_fd, _direct), name="stderr-json", daemon=True
    )
    _pump.start()
    atexit.register(_restore_stderr, _direct.fileno(), _pump)


def _pump_lines(read_fd: int, out: _FdWriter) -> None:
    pending = b""
    with open(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            while len(pending) > _MAX_LINE:
                lines.append(pending[:_MAX_LINE])
                pending = pending[_MAX_LINE:]
            for line in lines:
                _emit(out, line)
    if pending:
        _emit(out, pending)


_wrapper = JsonFormatter()


def _emit(out: _FdWriter, line: bytes) -> None:
    text = line.decode("utf-8", "replace").rstrip("\r")
    if not text.strip():
        return
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(text), dict):
                out.write(text + "\n")
                return
    record = logging.LogRecord("stderr", logging.WARNING, "", 0, text, None, None)
    out.write(_wrapper.format(record) + "\n")


def _restore_stderr(original_fd: int, pump: threading.Thread) -> None:
    """Give fd 2 back to the real stderr; the pipe's last writer closes, the pump drains it."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(original_fd, 2)
    pump.join(timeout=2.0)  # a child holding the pipe open would keep it from ending
