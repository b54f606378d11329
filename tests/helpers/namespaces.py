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
