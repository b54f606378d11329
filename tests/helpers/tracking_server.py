"""A real MLflow tracking server for tests: ``mlflow server`` over a database, serving the
artifacts itself (``--serve-artifacts``), on a free loopback port; and the processes a
server or a database leaves behind, found by walking ``/proc``.

The server runs in a session (process group) of its own: uvicorn, its workers and anything
else MLflow starts are in it, so stopping the group stops them all, and the test can check
that nothing of it is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import port_for

from agelab.processes import pid_alive

#: Two shared cores: two uvicorn workers, no job runner, no telemetry.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
#: Requests to the loopback server never go through a proxy the environment may name.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    pid: int  # the server's CLI process, leader of its process group
    artifacts: Path  # --artifacts-destination
    log: Path

    def get(self, path: str, timeout: float = 30) -> bytes:
        with _DIRECT.open(self.base + path, timeout=timeout) as resp:
            return resp.read()

    def api(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A REST call: GET ``/api/2.0/mlflow/<path>``, or POST with a JSON ``body``."""
        url = f"{self.base}/api/2.0/mlflow/{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        with _DIRECT.open(request, timeout=30) as resp:
            return json.loads(resp.read())


def server_command(backend_uri: str, artifacts: Path, port: int) -> list[str]:
    """What docs/scaling.md tells people to run, on loopback."""
    return [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", backend_uri),
        *("--serve-artifacts", "--artifacts-destination", str(artifacts)),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "2"),
    ]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[Server]:
    """Start the server, wait until ``/health`` answers, stop its whole group on exit."""
    port = port_for.select_random()
    artifacts.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            server_command(backend_uri, artifacts, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | SERVER_ENV,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", proc.pid, artifacts, log)
    try:
        _wait_healthy(server, proc)
        yield server
    finally:
        stop_group(proc)


def _wait_healthy(server: Server, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}"
            )
        with contextlib.suppress(OSError):
            if server.get("/health", timeout=5).strip() == b"OK":
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"mlflow server not healthy in {timeout} s:\n{server.log.read_text()[-3000:]}"
    )


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(name))
    return found


def descendants(pid: int) -> list[int]:
    """``pid``'s live descendants (children, their children, …)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the group led by ``proc``; SIGKILL what is left once it ended or after
    ``grace`` s; return once no process of the group is alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_gone(group_members(proc.pid), what=f"process group {proc.pid}")


def wait_gone(pids: list[int], what: str, timeout: float = 15) -> None:
    """Fails naming ``what`` when any of ``pids`` is still alive after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"{what}: processes {alive} still running"
