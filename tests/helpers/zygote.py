"""Real ``agelab`` invocations forked from a *zygote*: a Python process that imported torch,
timm, mlflow and optuna once (~10 s on 2 cores) and forks one child per invocation, so each
run starts in milliseconds. The zygote opens no store and runs no torch op, so a child is
what a fresh ``agelab run`` is, minus the import time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers import REPO

ZYGOTE = r"""
import json, os, re, resource, signal, sys, time, traceback
import torch, timm, mlflow, optuna, sqlalchemy  # noqa: F401  (the import cost, paid once)
from mlflow.tracking import MlflowClient  # noqa: F401
import agelab.cli, agelab.study, agelab.objective, agelab.train, agelab.tracking  # noqa
import agelab.data.load, agelab.data.synth, agelab.metrics, agelab.plots, agelab.models  # noqa
import agelab.reporting  # noqa


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def child(cmd):
    fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(cmd.get("env") or {})
    if cmd.get("as_extra_mb"):  # a memory cap: what is mapped now + this much
        vm = int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024
        cap = vm + cmd["as_extra_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    if cmd.get("fsize"):  # files may not grow past this: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], resource.RLIM_INFINITY))
    return agelab.cli.main(cmd["argv"])


reply({"ready": os.getpid()})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "start":
        pid = os.fork()
        if pid == 0:
            rc = 70
            try:
                rc = child(cmd)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc or 0)
        reply({"pid": pid})
    elif cmd["op"] == "wait":
        deadline = time.time() + cmd["timeout"]
        while True:
            done, status = os.waitpid(cmd["pid"], os.WNOHANG)
            if done:
                reply({"rc": os.waitstatus_to_exitcode(status)})
                break
            if time.time() > deadline:
                os.kill(cmd["pid"], signal.SIGKILL)
                os.waitpid(cmd["pid"], 0)
                reply({"rc": None})
                break
            time.sleep(0.02)
"""


class Zygote:
    """Forks ``agelab`` invocations from a process with the heavy imports done."""

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command the zygote runs under (e.g. ``unshare`` into a namespace of
        its own, see :func:`helpers.namespaces.as_host`); its forks run there too."""
        env = os.environ | {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert "ready" in self._reply(), "the zygote did not start"

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit code {self.proc.wait()})")
        return json.loads(line)

    def _send(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def start(self, argv: list[str], log: Path, env: dict | None = None, **limits) -> int:
        return self._send(op="start", argv=argv, log=str(log), env=env or {}, **limits)["pid"]

    def wait(self, pid: int, timeout: float = 240) -> int | None:
        """Exit code (negative: killed by that signal); None after a timeout (child killed)."""
        return self._send(op="wait", pid=pid, timeout=timeout)["rc"]

    def run(self, argv: list[str], log: Path, env: dict | None = None, **limits) -> int | None:
        return self.wait(self.start(argv, log, env, **limits))

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
