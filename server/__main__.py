"""``python -m server --model models/model.onnx --host 127.0.0.1 --port 8000``.

Flags override the environment (MODEL_PATH, HOST, PORT, ...), which overrides the defaults.
One uvicorn worker with uvloop and httptools; the app writes its own JSON request log, so
uvicorn's access log is off. SIGTERM: turn /health/ready to 503 and keep serving for
DRAIN_DELAY_S (0 by default; see server/drain.py), stop accepting, finish in-flight requests
within GRACEFUL_TIMEOUT_S, run the shutdown (flush monitoring), exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server import __version__
from server.settings import _PARSERS, Settings, SettingsError
from server.settings_docs import SettingDoc, help_line, setting_docs

GIL_SWITCH_INTERVAL_S = 0.0005  # see main()


def _typed(doc: SettingDoc) -> Callable[[str], Any]:
    """The parser the setting's environment variable goes through ("1_000" is an integer, "nan"
    is refused), named for argparse's error: "argument --port: invalid integer value: 'x'"."""
    parse = _PARSERS[doc.name]

    def parser(text: str) -> Any:
        return parse(text)

    parser.__name__ = {"int": "integer", "float": "number"}.get(doc.kind, "string")
    return parser


class _RefuseSecret(argparse.Action):
    """``--api-token``: a usage error that names the variable and never echoes the value."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        env = self.dest.upper()
        parser.error(f"{self.option_strings[0]}: set {env} in the environment instead (a command "
                     "line is visible to every local user)")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """One flag per setting (``--kebab-case`` of the field), generated from :class:`Settings`."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        usage="%(prog)s [-h] [--version] [--SETTING VALUE ...]",
        description="Serve the cat-or-dog ONNX model over HTTP. Every setting is an environment "
        "variable; its flag, when given, wins.",
        epilog="Environment only: "
        + ", ".join(d.env for d in setting_docs() if not d.flags)
        + " (secrets stay off the command line, where every local user can read them).",
        allow_abbrev=False,  # a misspelt flag in a manifest fails instead of matching another
    )
    parser.add_argument(
        "--version", action="store_true", help="print the server and model versions and exit"
    )
    for doc in setting_docs():
        if not doc.flags:  # a secret: refused by name, so the value is never echoed back
            flag = "--" + doc.name.replace("_", "-")
            parser.add_argument(
                flag, dest=doc.name, nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS
            )
        else:
            parser.add_argument(
                *doc.flags,
                dest=doc.name,
                type=_typed(doc),
                metavar=doc.env,
                help=help_line(doc).replace("%", "%%"),  # argparse formats help with %
            )
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The environment's settings with the flags given on the command line laid over them."""
    settings = Settings.from_env(environ)
    given = vars(args)
    overrides = {
        f.name: given[f.name] for f in dataclasses.fields(Settings) if given.get(f.name) is not None
    }
    if given.get("model_path") is not None and given.get("model_uri") is None:
        overrides["model_uri"] = ""  # an explicit file beats a MODEL_URI from the environment
    return dataclasses.replace(settings, **overrides)


def version_line(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """``server X; model NAME VERSION (PATH)``, or why no model could be read; never raises."""
    head = f"server {__version__}"
    try:
        settings = build_settings(args, environ)
    except SettingsError as exc:
        return f"{head}; model: not read ({exc})"
    source = settings.model_source
    if source.startswith("models:"):
        # resolving a registry URI means network calls; --version stays local
        return f"{head}; model: {source} is resolved at start, not read by --version"
    from catsdogs.contract import ContractError
    from catsdogs.modelfile import ModelFileError, load_model_file
    from server.model_uri import RegistryError, resolve_model_uri

    try:
        path = resolve_model_uri(source, tracking_uri="", cache_dir=Path(settings.model_cache_dir))
        contract = load_model_file(path).contract
    except (ModelFileError, ContractError, RegistryError, OSError) as exc:
        return f"{head}; model: none readable at {source} ({exc})"
    return f"{head}; model {contract.model_name} {contract.model_version} ({path})"


def _stop_starting(signum: int, frame: object) -> None:
    from server.inference import stop_children  # loaded already, before this handler was set

    stop_children()  # the load runs on its own thread: its child is stopped from here
    raise SystemExit(128 + signum)


def _exit_after_shutdown(server: Any) -> Callable[[int, object], None]:
    """The handler of the signal uvicorn re-raises once its shutdown is done. Graceful (every
    request in flight answered, the prediction log flushed): exit 0. Forced by a second Ctrl-C
    (requests cut, no lifespan shutdown, so queued log rows lost): exit 1, and said."""

    def handler(signum: int, frame: object) -> None:
        if server.force_exit:
            logging.getLogger("server").error(
                "forced to stop: requests in flight were cut off and the prediction log was "
                "not flushed"
            )
            raise SystemExit(1)
        raise SystemExit(0)

    return handler


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to HOST:PORT, not yet listening (connections are refused until uvicorn
    listens on it), with uvicorn's own options."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _raise_open_files_limit(connections: int) -> None:
    """Room for MAX_CONNECTIONS sockets plus the server's own files, within the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        if new_soft < wanted:
            logging.getLogger("server").warning(
                "open files limited to %d; MAX_CONNECTIONS=%d may not all be accepted",
                new_soft,
                connections,
            )


def main(argv: list[str] | None = None) -> int:
    from server.logs import capture_native_stderr
    from server.malloc import cap_arenas

    cap_arenas()  # before any thread (create_app's call comes after the stderr reader's)

    capture_native_stderr()  # C libraries' plain-text stderr lines become JSON lines too
    args = parse_args(argv)
    if args.version:
        print(version_line(args))
        return 0
    try:
        settings = build_settings(args)
    except SettingsError as exc:
        # a record at level error (printed, it was a "warning" line of captured stderr), so a
        # filter on errors finds why a replica never started
        from server.logs import configure_logging

        configure_logging("INFO")
        logging.getLogger("server").error("cannot serve: %s", exc)
        return 2

    import uvicorn

    from server.app import create_app, load_served_model
    from server.drain import DrainingServer
    from server.inference import ModelLoadError
    from server.model_uri import RegistryError
    from server.protocol import GuardedHttpToolsProtocol

    app = create_app(settings)
    app.state.startup.end("boot")
    ignored = os.environ.get("MODEL_URI", "")
    if args.model_path is not None and args.model_uri is None and ignored:
        # said once: a user who set MODEL_URI would otherwise believe the registry's model runs
        logging.getLogger("server").warning(
            "serving --model %s: MODEL_URI=%s from the environment is ignored",
            args.model_path,
            ignored,
        )
    try:
        # The address first: a port in use or a host that does not resolve fails in a
        # millisecond, not after the model's download, load and warm-up (uvicorn binds last).
        listener = _bind(settings.host, settings.port)
    except OSError as exc:
        logging.getLogger("server").error(
            "cannot serve: cannot listen on %s:%d: %s",
            settings.host,
            settings.port,
            exc.strerror or exc,
        )
        return 1
    host, port = listener.getsockname()[:2]
    # the address to call, in the ready line (PORT=0: the port the system chose; bound to every
    # interface, the loopback one: 0.0.0.0 is no address to call)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    app.state.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    # Until uvicorn takes the signals over: SIGTERM unwinds the start-up like Ctrl-C, so what
    # it started is stopped (the child that optimises a cascade is killed and reaped, where the
    # default action left it running on, orphaned) and the exit status says which signal.
    signal.signal(signal.SIGTERM, _stop_starting)
    try:
        # Loaded here, before uvicorn, so a bad model is one clear line and a non-zero exit.
        app.state.model = load_served_model(settings)
        app.state.startup.end("model_load")
    except (ModelLoadError, RegistryError, OSError) as exc:
        logging.getLogger("server").error("cannot serve: %s", exc)
        return 1
    _raise_open_files_limit(settings.max_connections)
    # Under load, the parallel runs' threads and the event loop take turns holding the GIL
    # between their C calls; a thread that wants it waits up to this long for the holder to
    # let go. Python's default, 5 ms, left a core idle at times: at 0.5 ms images/s at
    # concurrency 16 rose by about 6% (median of six interleaved rounds; make bench).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=GuardedHttpToolsProtocol.configure(settings),  # httptools + head size and deadline
        lifespan="on",
        access_log=False,
        log_config=None,  # keep the JSON logging create_app configured
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,  # beyond: 503 at once
        server_header=False,
    )
    server = DrainingServer(config, app, settings.drain_delay_s)  # DRAIN_DELAY_S, see drain.py
    signal.signal(signal.SIGTERM, _exit_after_shutdown(server))
    signal.signal(signal.SIGINT, _exit_after_shutdown(server))
    server.run(sockets=[listener])  # it listens once the lifespan has started
    if not server.started:
        logging.getLogger("server").error("startup failed; exiting")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
