"""A throwaway PostgreSQL server for tests: initdb + pg_ctl from the Debian package.

The server listens on 127.0.0.1 only (a free port), keeps its unix socket inside its own
temporary folder, trusts every local connection and runs without fsync: it exists for one
test session and is removed afterwards. As root (initdb refuses to run as root) every server
command runs as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

HOW_TO_INSTALL = (
    "install the Debian package `postgresql` (`make sysdeps` does it as root, or "
    "`apt-get install postgresql`)"
)


class PgUnavailable(RuntimeError):
    """PostgreSQL is not installed here (tests skip); the message says how to install it."""


class PgError(RuntimeError):
    """PostgreSQL is installed but a server command failed (tests fail, with its log)."""


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and pg_ctl."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True):
        bin_dir = Path(initdb).parent
        if (bin_dir / "pg_ctl").is_file():
            return bin_dir
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin_dir: Path
    base: Path  # temporary folder: data/, sock/, server.log
    port: int
    as_postgres: bool  # run server commands through `runuser -u postgres`
    superuser: str = "postgres"
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def sockets(self) -> Path:
        return self.base / "sock"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def url(self, database: str, user: str | None = None, password: str | None = None) -> str:
        """A SQLAlchemy URL (psycopg2 driver) for ``database``."""
        cred = quote(user or self.superuser, safe="")
        if password is not None:
            cred += ":" + quote(password, safe="")
        return f"postgresql+psycopg2://{cred}@{self.host}:{self.port}/{database}"

    # ------------------------------------------------------------------ commands
    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_postgres else cmd

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        out = subprocess.run(
            self._cmd(tool, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,  # runuser keeps the cwd; postgres must be able to enter it
        )
        if out.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PgError(
                f"{tool} {' '.join(args)} failed (exit {out.returncode}):\n"
                f"{out.stdout[-2000:]}{out.stderr[-2000:]}\n{log}"
            )

    def start(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        conf = "\n".join(
            [
                "",
                "# agelab tests: loopback only, private socket folder, no durability",
                "listen_addresses = '127.0.0.1'",
                f"port = {self.port}",
                f"unix_socket_directories = '{self.sockets}'",
                "max_connections = 200",
                "fsync = off",
                "synchronous_commit = off",
                "full_page_writes = off",
                "",
            ]
        )
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write(conf)
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def connect(self, database: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=self.superuser, dbname=database
        )
        conn.autocommit = True
        return conn

    def execute(self, *statements: str, database: str = "postgres") -> None:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, name: str, owner: str | None = None) -> None:
        owner_sql = f' OWNER "{owner}"' if owner else ""
        self.execute(f'CREATE DATABASE "{name}"{owner_sql}')


@contextlib.contextmanager
def pg_server():
    """Start a private PostgreSQL server; always stopped and removed on exit."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PgUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under "
            f"/usr/lib/postgresql/*/bin: {HOW_TO_INSTALL}"
        )
    as_postgres = os.geteuid() == 0
    if as_postgres:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PgUnavailable(
                f"running as root but there is no `postgres` user to run the server: "
                f"{HOW_TO_INSTALL}"
            ) from None
        if shutil.which("runuser") is None:
            raise PgUnavailable("running as root but `runuser` (Debian util-linux) is missing")
    # Not under pytest's tmp_path: its parents are private to root (mode 0700).
    base = Path(tempfile.mkdtemp(prefix="agelab-pg-"))
    (base / "sock").mkdir()
    if as_postgres:
        for path in (base, base / "sock"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    server = PgServer(bin_dir, base, free_port(), as_postgres)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
