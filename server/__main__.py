"""``python -m server --model models/model.onnx --host 127.0.0.1 --port 8000``.

Flags override the environment (MODEL_PATH, HOST, PORT, ...), which overrides the defaults.
One uvicorn worker with uvloop and httptools; the app writes its own JSON request log, so
uvicorn's access log is off. SIGTERM: stop accepting, finish in-flight requests within
GRACEFUL_TIMEOUT_S, run the shutdown (flush monitoring), exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Mapping

from server.settings import Settings, SettingsError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve the cat-or-dog ONNX model over HTTP. Every flag also has an "
        "environment variable; flags win.",
    )
    parser.add_argument("--model", dest="model_path", help="ONNX model file (MODEL_PATH)")
    parser.add_argument("--model-uri", help="e.g. models:/catsdogs@champion (MODEL_URI)")
    parser.add_argument("--host", help="bind address (HOST)")
    parser.add_argument("--port", type=int, help="bind port (PORT)")
    parser.add_argument("--log-level", help="debug, info, warning, error (LOG_LEVEL)")
    parser.add_argument("--max-batch-size", type=int, help="1 disables batching (MAX_BATCH_SIZE)")
    parser.add_argument("--intra-op-threads", type=int, help="0 = usable CPUs (INTRA_OP_THREADS)")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The environment's settings with the flags given on the command line laid over them."""
    settings = Settings.from_env(environ)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    if args.model_path is not None and args.model_uri is None:
        overrides["model_uri"] = ""  # an explicit file beats a MODEL_URI from the environment
    return dataclasses.replace(settings, **overrides)


def _exit_after_graceful_shutdown(signum: int, frame: object) -> None:
    # uvicorn re-raises the signal it caught once its graceful shutdown is done; by then
    # every in-flight request has been answered, so the process ends normally.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
    except SettingsError as exc:
        print(f"python -m server: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from server.app import create_app, load_served_model
    from server.inference import ModelLoadError
    from server.registry import RegistryError

    app = create_app(settings)
    try:
        # Loaded here, before uvicorn, so a bad model is one clear line and a non-zero exit.
        app.state.model = load_served_model(settings)
    except (ModelLoadError, RegistryError, OSError) as exc:
        logging.getLogger("server").error("cannot serve: %s", exc)
        return 1
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,  # keep the JSON logging create_app configured
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        server_header=False,
    )
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, _exit_after_graceful_shutdown)
    signal.signal(signal.SIGINT, _exit_after_graceful_shutdown)
    server.run()
    if not server.started:
        logging.getLogger("server").error("startup failed; exiting")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
