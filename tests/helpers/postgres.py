"""A throwaway PostgreSQL server for tests, run by pytest-postgresql's executor.

pytest-postgresql drives the system's ``pg_ctl`` (Debian package ``postgresql``): initdb,
start, wait, stop, remove. Two things it cannot do alone, hence this module:

* ``initdb``/``postgres`` refuse to run as root, and tests here and in CI run as root. Its
  executor calls one ``pg_ctl`` executable for everything, so as root that executable is a
  two-line script running the real ``pg_ctl`` through ``runuser -u postgres``.
* The ``postgres`` user cannot enter pytest's temporary folders (``/tmp/pytest-of-root`` is
  mode 0700), which is where the ``postgresql_proc`` factory puts the cluster; so the
  executor gets a folder the ``postgres`` user owns instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import port_for
from pytest_postgresql.executors import PostgreSQLExecutor
from pytest_postgresql.janitor import DatabaseJanitor

HOW_TO_INSTALL = (
    "install the Debian package `postgresql` (`make sysdeps` does it as root, or "
    "`apt-get install postgresql`)"
)
# One test session, thrown away afterwards: no durability, room for 4 workers' pools.
SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)


class PgUnavailable(RuntimeError):
    """PostgreSQL cannot run here (tests skip); the message says how to install it."""


def find_pg_ctl() -> str:
    """The newest ``/usr/lib/postgresql/<version>/bin/pg_ctl``, else ``pg_ctl`` on PATH."""

    def version(path: str) -> int:
        return int(Path(path).parts[-3].split(".")[0])

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version, reverse=True)
    pg_ctl = found[0] if found else shutil.which("pg_ctl")
    if not pg_ctl:
        raise PgUnavailable(f"no pg_ctl under /usr/lib/postgresql/*/bin: {HOW_TO_INSTALL}")
    return pg_ctl


def _as_postgres_user(pg_ctl: str, base: Path, cluster: Path) -> str:
    """As root: a ``pg_ctl`` that runs as ``postgres``, and ``cluster`` owned by it."""
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise PgUnavailable(
            f"running as root but there is no `postgres` user: {HOW_TO_INSTALL}"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PgUnavailable("running as root but `runuser` (Debian util-linux) is missing")
    os.chown(cluster, user.pw_uid, user.pw_gid)
    base.chmod(0o711)  # postgres may pass through the root-owned folder, not list it
    wrapper = base / "pg_ctl"
    wrapper.write_text(f'#!/bin/sh\nexec {runuser} -u postgres -- {pg_ctl} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@contextlib.contextmanager
def postgres_server(*databases: str) -> Iterator[PostgreSQLExecutor]:
    """Start a private server on 127.0.0.1 with ``databases``; stopped and removed on exit."""
    pg_ctl = find_pg_ctl()
    base = Path(tempfile.mkdtemp(prefix="agelab-pg-"))  # root-owned: holds the wrapper
    cluster = base / "cluster"  # data, log and unix socket: owned by the server's user
    cluster.mkdir()
    try:
        if os.geteuid() == 0:
            pg_ctl = _as_postgres_user(pg_ctl, base, cluster)
        server = PostgreSQLExecutor(
            executable=pg_ctl,
            host="127.0.0.1",
            port=port_for.select_random(),
            datadir=str(cluster / "data"),
            unixsocketdir=str(cluster),
            logfile=str(cluster / "server.log"),
            startparams="-w",
            dbname="postgres",
            postgres_options=SERVER_OPTIONS,
        )
        with server:  # initdb + pg_ctl start -w; pg_ctl stop on exit
            for name in databases:
                DatabaseJanitor(
                    user=server.user, host=server.host, port=server.port, dbname=name
                ).init()
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def url(
    server: PostgreSQLExecutor, database: str, user: str | None = None, password: str | None = None
) -> str:
    """A SQLAlchemy URL (psycopg2 driver) for ``database`` on ``server``."""
    cred = quote(user or server.user, safe="")
    if password is not None:
        cred += ":" + quote(password, safe="")
    return f"postgresql+psycopg2://{cred}@{server.host}:{server.port}/{database}"


def execute(server: PostgreSQLExecutor, *statements: str) -> None:
    """Run SQL statements as the superuser, autocommit, on the ``postgres`` database."""
    janitor = DatabaseJanitor(
        user=server.user, host=server.host, port=server.port, dbname="postgres"
    )
    with janitor.cursor() as cur:
        for sql in statements:
            cur.execute(sql)
