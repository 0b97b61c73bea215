"""Run the locust load test headless, against a server it starts itself or one given by URL.

    python -m loadtest.run_load --model models/model.onnx          # starts and stops a server
    python -m loadtest.run_load --url http://127.0.0.1:8000        # an already running server

Writes ``<out>/locust_final.json`` (what the verdict was made of), ``<out>/locust_stats.csv`` (and
the other locust CSVs), ``<out>/locust.html`` and, when it started the server,
``<out>/server.log``. Exits with locust's code: non-zero on any failed request
or breached threshold. A server it started is stopped by PID afterwards, whatever happened.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.serverproc import DEFAULT_PHOTOS, ROOT, exit_on_sigterm, running_server
from loadtest.thresholds import DEFAULT_PATH, load_thresholds

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command(url: str, args: argparse.Namespace) -> list[str]:
    out: Path = args.out
    return [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--host", url,
        "--headless",
        "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.run_time,
        "--stop-timeout", "10",
        "--csv", str(out / "locust"),
        "--html", str(out / "locust.html"),
        "--thresholds", str(args.thresholds),
        "--only-summary",
    ]  # fmt: skip


def run_locust(url: str, args: argparse.Namespace, traffic: str) -> int:
    """Locust against ``url``; its predictions carry ``X-Traffic-Class: traffic`` unless
    LOAD_TRAFFIC_CLASS says otherwise."""
    env = {"LOAD_TRAFFIC_CLASS": traffic, **os.environ, "PYTHONPATH": str(ROOT)}
    log.info("locust: %d users for %s against %s", args.users, args.run_time, url)
    return subprocess.run(locust_command(url, args), cwd=ROOT, env=env, check=False).returncode


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="start a server with this model")
    target.add_argument("--url", help="test this running server instead")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=5.0)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "load")
    parser.add_argument("--thresholds", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    try:  # a bad budgets file is said now, not after the whole run
        load_thresholds(args.thresholds)
    except (OSError, ValueError) as exc:
        parser.error(f"--thresholds {args.thresholds}: {exc}")
    photos = Path(os.environ.get("LOAD_PHOTOS", DEFAULT_PHOTOS))
    if not photos.is_dir():  # said before a server starts, not in locust's traceback after
        parser.error(f"no photo folder at {photos}: set LOAD_PHOTOS=/folder (cat/, dog/)")
    args.out.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()  # a SIGTERM stops the server and locust before this process ends

    if args.url:
        # a running server may be production: its prediction log, drift window and live
        # figures must not count the load (LOAD_TRAFFIC_CLASS=production to test them too)
        sys.exit(run_locust(args.url.rstrip("/"), args, "evaluation"))
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (run `make pipeline` first)")
    # the server's prediction store goes to a scratch folder, not the project's var/
    with (
        tempfile.TemporaryDirectory(prefix="load-") as scratch,
        running_server(
            args.model.resolve(),
            args.out / "server.log",
            env={"PREDICTION_LOG_PATH": str(Path(scratch) / "predictions.db")},
        ) as server,
    ):
        log.info("server ready in %.2f s", server.ready_s)
        code = run_locust(server.url, args, "production")  # the prediction log under load too
        if not server.alive():
            log.error("the server died during the load test (exit %s)", server.proc.returncode)
            code = code or 1
    sys.exit(code)


if __name__ == "__main__":
    main()
