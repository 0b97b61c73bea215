"""A throwaway PostgreSQL server for tests: Debian's binaries, a temp folder, 127.0.0.1 only.

``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as ``nobody`` (through
``runuser``); as any other user (a CI runner) they run as that user. The cluster lives in its
own folder under the system temp dir (pytest's folders are private to root, so ``nobody`` could
not enter them), listens on a free port of 127.0.0.1 with its unix socket in that folder, and
requires a password over TCP, so the URLs tests hand to the server carry one, as in production.

    with PostgresServer() as pg:
        url = pg.create_database("predictions")   # postgresql://postgres:...@127.0.0.1:PORT/...
        pg.restart()                               # pg_ctl restart -m fast
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"
INSTALL_HINT = "install Debian's postgresql package: make postgresql (apt-get install postgresql)"


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian keeps one per major version)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        raise RuntimeError(f"no PostgreSQL server binaries in /usr/lib/postgresql; {INSTALL_HINT}")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temp folder; ``fsync`` off by default (tests, not disks)."""

    def __init__(self, *, fsync: bool = False, max_connections: int = 100) -> None:
        self.bin = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="catsdogs-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self.password = secrets.token_hex(12)
        self.fsync = fsync
        self.max_connections = max_connections
        self._user = "nobody" if os.geteuid() == 0 else None
        self._started = False

    # ------------------------------------------------------------------ commands
    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}"
            )
        return done

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _options(self) -> str:
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            f"-k {self.root}",  # the unix socket stays in the temp folder
            f"-c max_connections={self.max_connections}",
        ]
        if not self.fsync:
            options += ["-c fsync=off", "-c full_page_writes=off", "-c synchronous_commit=off"]
        return " ".join(options)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostgresServer:
        if not self.data.exists():
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._user is not None:
                shutil.chown(self.root, self._user)
                shutil.chown(pwfile, self._user)
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",  # TCP needs the password
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            pwfile.unlink()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", self._options(), "start")  # fmt: skip
        self._started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self._started = False

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every connection is cut, the server is back on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w",
                  "-t", "60", "-o", self._options(), "restart")  # fmt: skip
        self._started = True

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ databases
    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL (with the password)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)
