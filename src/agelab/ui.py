"""The two browsers over a study: MLflow's UI (runs, metrics, figures) and optuna-dashboard
(the search). Both bind to loopback unless the user explicitly exposes them: neither has
authentication, and anyone who reaches them can read and change the runs.

Before serving, both check that there is something to show (the store exists) and that the
port is free, and stop with one line saying what to do otherwise. ``mlflow ui`` is a tree of
processes (the CLI, uvicorn and its workers, MLflow's job runner and its consumers); it runs
in a process group of its own that ``agelab ui`` ends as a whole when it is stopped
(Ctrl-C, SIGTERM, SIGHUP), and a watchdog ends it when ``agelab ui`` dies any other way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from agelab.config import StudyConfig, TrackingConfig
from agelab.errors import StoreError, UserError
from agelab.secrets import mask_uri
from agelab.tracking import default_uri

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Seconds the server tree gets to stop on SIGTERM before what is left of it is killed.
STOP_GRACE_S = 3.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def bind_allowed(host: str, expose: bool, who: str) -> bool:
    """UIs bind to loopback unless the user explicitly exposes them (they have no auth)."""
    if host in LOOPBACK or expose:
        return True
    print(
        f"{who}: refusing to bind {host}: it has no authentication and anyone who reaches it "
        "can read and change your runs. Pass --expose to do it anyway.",
        file=sys.stderr,
    )
    return False


# ------------------------------------------------------------------------ before serving


def local_file(url: str) -> Path | None:
    """The file behind a SQLite URI or an Optuna ``journal:`` URL; None for anything else
    (a server, an in-memory database), which cannot be checked from here."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            rest = url[len(prefix) :].split("?", 1)[0]
            return Path(rest) if rest and rest != ":memory:" else None
    return None


def require_store(url: str, what: str, flag: str) -> None:
    """Refuse to serve an empty store: a missing file would be created empty and shown as
    if the studies were gone."""
    path = local_file(url)
    if path is None or path.is_file():
        return
    raise StoreError(
        f"no {what} at {path}: there is nothing to show yet. Run a study first (make demo, or "
        f"agelab run experiments/<study>.yaml), or point {flag} at the store that has one"
    )


def _bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port`` now; None when it could."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"cannot resolve --host {host!r} ({exc}); use 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        # As the servers do: a port whose old connections linger in TIME_WAIT is usable.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            return exc
    return None


def require_free_port(host: str, port: int, who: str) -> None:
    """Fail now, naming the port, when the server could not listen on it (the server alone
    would start its workers first, or fail with a traceback, or not at all)."""
    error = _bind_error(host, port)
    if error is None:
        return
    if error.errno != errno.EADDRINUSE:
        raise UserError(
            f"{who} cannot listen on {host}:{port}: {error.strerror or error}; choose "
            "another --port (one above 1023 needs no privileges)"
        )
    candidates = range(port + 1, min(port + 21, 65536))
    free = next((p for p in candidates if _bind_error(host, p) is None), None)
    make = "ui PORT" if who.endswith(" ui") else "dashboard DASH_PORT"
    hint = f" (e.g. --port {free}, or make {make}={free})" if free else ""
    raise UserError(
        f"port {port} on {host} is already in use, maybe by another agelab ui or "
        f"dashboard; stop that process (ss -ltnp 'sport = :{port}' shows it) or choose "
        f"another port{hint}"
    )


# --------------------------------------------------------------------------- MLflow UI


def serve_ui(*, host: str, port: int, root: Path, expose: bool) -> int:
    """``mlflow ui`` over the default store, on loopback unless ``expose`` is given."""
    if not bind_allowed(host, expose, "agelab ui"):
        return 2
    uri = default_uri(TrackingConfig(root=root))
    require_store(uri, "MLflow store", "--root")
    require_free_port(host, port, "agelab ui")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        (root / "artifacts").resolve().as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    base = f"http://{browser_host(host)}:{port}"
    print(f"MLflow UI on {base}  (store {mask_uri(uri)}; Ctrl-C stops)")
    for line in study_links(uri, base):
        print(line)
    sys.stdout.flush()
    env = {
        # MLflow's job runner (and its consumer processes) serve a feature agelab never uses:
        # off, unless the user turned it on.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"
        ),
        # MLflow's usage telemetry (the server's and the pages'): off unless the user opts in.
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
    }
    code = run_process_group(cmd, env=env)
    if code is None:  # stopped by Ctrl-C / SIGTERM: the normal end of a server
        return 0
    if code:
        print(f"agelab ui: mlflow ui exited with code {code} (its messages are above)")
    return code if code > 0 else 1  # killed by a signal (code -N)


def browser_host(host: str) -> str:
    """The host a browser on this machine reaches a server bound to ``host`` at."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def runs_url(base: str, experiment_id: str) -> str:
    """The runs table of an experiment in MLflow 3's UI (its hash routes), in its "Model
    training" view: MLflow 3.17 picks GenAI or model-training pages by a switch each browser
    remembers (GenAI until a person flips it), which the URL's ``workflowType`` overrides."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def study_links(uri: str, base: str) -> list[str]:
    """One line per study in the store: its experiment's name and the URL of its runs
    table. Listing them is a convenience: a store that cannot be read here is said in one
    line, and the server still starts (and says what it finds)."""
    from agelab.tracking.store import study_experiments

    try:
        studies = study_experiments(uri)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [f"  (could not list the studies: {mask_uri(first)[:200]})"]
    if not studies:
        return ["  no studies in this store yet"]
    width = max(len(name) for name, _ in studies)
    return [f"  {name:<{width}}  {runs_url(base, exp_id)}" for name, exp_id in studies]


def run_process_group(cmd: list[str], env: dict[str, str] | None = None) -> int | None:
    """Run ``cmd`` (with ``env`` added to the environment) in a session of its own until it
    ends (its exit code) or this process is asked to stop (None); either way no process of
    its group is left behind."""
    env = os.environ | (env or {})
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent(), env=env)
    watchdog = _start_watchdog(proc.pid)
    try:
        with _signals_stop():
            return proc.wait()
    except _Stop:
        return None
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave half the tree running.
        with _signals_ignored():
            stop_group(proc)
            if watchdog is not None:
                watchdog.stdin.close()  # the group is gone: the watchdog just exits
                watchdog.wait()


class _Stop(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP reached the server command. A KeyboardInterrupt, so that no
    library's ``except Exception`` (a request handler's, say) swallows it."""


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    def stop(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group led by ``proc``; once ``proc`` has ended (or after
    :data:`STOP_GRACE_S`), SIGKILL what is left: MLflow's job runner and its consumers keep
    running for many seconds after a SIGTERM, and nothing needs them once the server is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGTERM when this process dies (Linux), so the
    server starts stopping even before the watchdog acts; None where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# Ends the server's process group once agelab ui is gone, however it went (even SIGKILL,
# which no handler sees): it waits for EOF on its stdin, whose only writer is agelab ui.
_WATCHDOG = r"""
import os, signal, sys, time
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
sys.stdin.buffer.read()

def alive():
    try:
        names = os.listdir("/proc")
    except OSError:
        names = None
    if names is None:
        try:
            os.killpg(pgid, 0)
            return True
        except OSError:
            return False
    for name in names:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False

for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
    if not alive():
        break
    try:
        os.killpg(pgid, sig)
    except OSError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end and alive():
        time.sleep(0.1)
"""


def _start_watchdog(pgid: int) -> subprocess.Popen | None:
    """The watchdog of the group ``pgid``, in a session of its own so that a signal to this
    process's group (a terminal's Ctrl-C, a supervisor's kill) does not reach it."""
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-c", _WATCHDOG, str(pgid), str(STOP_GRACE_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:  # the server still runs and is still stopped by our signals
        print(f"agelab: no watchdog for the server ({exc})", file=sys.stderr)
        return None


# --------------------------------------------------------------------- optuna-dashboard


def serve_dashboard(*, host: str, port: int, root: Path, storage: str | None, expose: bool) -> int:
    """optuna-dashboard over the study storage (default: the journal under ``root``)."""
    if not bind_allowed(host, expose, "agelab dashboard"):
        return 2
    from agelab.study import storage_url

    url = storage or storage_url(StudyConfig(name="x", tracking={"root": root}))
    require_store(url, "Optuna study storage", "--root (or --storage)")
    require_free_port(host, port, "agelab dashboard")
    from optuna_dashboard import wsgi

    from agelab.study import open_storage

    app = wsgi(open_storage(url))
    print(f"optuna-dashboard on http://{host}:{port}  (storage {mask_uri(url)}; Ctrl-C stops)")
    serve_wsgi(app, host, port)
    return 0


def serve_wsgi(app: Callable, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C, SIGTERM or SIGHUP. Requests are handled on a thread and a
    signal only sets an event: raised inside a request (as optuna-dashboard's own server
    lets it be), wsgiref answers it with an error page and serves on."""
    from wsgiref.simple_server import WSGIServer, make_server

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, server_class=Server)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in _STOP_SIGNALS}
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        while thread.is_alive() and not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.shutdown()  # lets the request being handled finish
        server.server_close()
