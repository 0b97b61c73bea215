"""JSON log lines: one object per line, so log shippers need no parsing rules."""

from __future__ import annotations

import json
import logging
import sys
import time

_CONFIGURED = "_catsdogs_json"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            # The trace goes to the log only, never to a client.
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Send the root logger's records to stderr as JSON lines; idempotent."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(getattr(h, _CONFIGURED, False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _CONFIGURED, True)
    root.addHandler(handler)
    # uvicorn's own loggers would print a second, plain-text copy of each line.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
