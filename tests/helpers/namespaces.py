"""Private mount namespaces, for tests that need a real full or read-only filesystem."""

from __future__ import annotations

import shutil
import subprocess

#: Run a command as root of a new user namespace with its own mounts (nothing reaches the host).
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def why_no_mount_namespace() -> str | None:
    """None when a tmpfs can be mounted in a private mount namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command is missing (util-linux)"
    probe = subprocess.run(
        [*UNSHARE, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return (
            f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[:200]}"
        )
    return None


#: A machine of its own, as far as agelab can tell: its own host name (UTS namespace) and its
#: own pids (PID namespace, /proc remounted), sharing only the filesystem and the network.
HOST = [*UNSHARE, "--uts", "--pid", "--fork", "--mount-proc"]


def as_host(name: str) -> list[str]:
    """A command prefix that runs what follows on the simulated host ``name``."""
    return [*HOST, "sh", "-c", 'hostname "$0" && exec "$@"', name]


def why_no_host_namespace() -> str | None:
    """None when a command can run under its own host name and pids here, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command is missing (util-linux)"
    probe = subprocess.run(
        [*as_host("agelab-probe"), "sh", "-c", 'test "$(hostname)" = agelab-probe && echo $$'],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        why = probe.stderr.strip()[:200] or f"exit {probe.returncode}, pid {probe.stdout.strip()}"
        return f"cannot give a process its own host name and pids (unshare --uts --pid): {why}"
    return None
