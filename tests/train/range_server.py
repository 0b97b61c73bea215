"""A tiny HTTP file server for the download tests: Range support, and faults on demand.

    python tests/train/range_server.py FILE [--drop-after N] [--ignore-range] [--log PATH]

Binds 127.0.0.1 on a free port and prints the port on stdout. ``--drop-after N``: the first
response stops after N body bytes (a dropped connection); ``--ignore-range`` answers 200 with the
whole file even to a Range request. Every request's Range header is appended to ``--log``.
"""

from __future__ import annotations

import argparse
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(data: bytes, drop_after: int | None, ignore_range: bool, log: Path | None):
    state = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

        def do_GET(self) -> None:
            state["requests"] += 1
            header = self.headers.get("Range")
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{header or '-'}\n")
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", header or "")
            if match and not ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/zip")
            self.end_headers()
            if drop_after is not None and state["requests"] == 1:
                self.wfile.write(body[:drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--drop-after", type=int)
    parser.add_argument("--ignore-range", action="store_true")
    parser.add_argument("--log")
    args = parser.parse_args()
    data = Path(args.file).read_bytes()
    handler = make_handler(
        data, args.drop_after, args.ignore_range, Path(args.log) if args.log else None
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
