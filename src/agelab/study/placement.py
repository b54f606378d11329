"""Which GPU each local worker process gets: one ``CUDA_VISIBLE_DEVICES`` entry per worker.

``agelab run --workers N`` on a machine with G visible GPUs puts worker *i* on GPU *i* mod G,
so each worker process sees exactly one device (its ``cuda:0``). ``--gpus 0,2`` restricts the
GPUs handed out; ``--workers-per-gpu k`` lets k workers share a GPU and, without
``--workers``, means N = (number of allowed GPUs) × k. Without a GPU nothing is set.

GPU ids are the indices this process's torch would use (``cuda:0`` … ``cuda:G-1``): under a
``CUDA_VISIBLE_DEVICES`` of the parent (``3,5``), id 1 is the parent's second entry (``5``),
and that entry is what the worker is given. :func:`plan_placement` is pure; :func:`visible_gpus`
reads the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from agelab.errors import UserError

CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"


def parse_visible(value: str) -> list[str]:
    """A ``CUDA_VISIBLE_DEVICES`` value as CUDA reads it: entries (ids, ``GPU-…`` UUIDs, MIG
    names) up to the first empty or negative one; ``""`` and ``-1`` hide every GPU."""
    found = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        found.append(item)
    return found


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may hand out, each as a worker's ``CUDA_VISIBLE_DEVICES`` names
    it: the parent's own list when that variable is set (a scheduler's grant, say), else
    ``0`` … ``count-1`` with ``count = torch.cuda.device_count()``."""
    env = os.environ if environ is None else environ
    if CUDA_VISIBLE in env:
        return parse_visible(env[CUDA_VISIBLE])
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _shown(visible: Sequence[str]) -> str:
    ids = f"ids 0-{len(visible) - 1}" if len(visible) > 1 else "id 0"
    parent = os.environ.get(CUDA_VISIBLE)
    return f"{len(visible)} visible GPU(s), {ids}" + (
        f" (CUDA_VISIBLE_DEVICES={parent})" if parent is not None else ""
    )


def _allowed(visible: Sequence[str], gpus: Sequence[int] | None) -> list[str]:
    """The visible GPUs ``--gpus`` allows (all of them without it), as worker entries."""
    if gpus is None:
        return list(visible)
    if not gpus:
        raise UserError("--gpus: give at least one GPU id, e.g. --gpus 0,1")
    for gpu in gpus:
        if not 0 <= gpu < len(visible):
            raise UserError(
                f"--gpus {','.join(map(str, gpus))}: GPU {gpu} is not visible; this machine "
                f"shows {_shown(visible)}"
            )
    if len(set(gpus)) != len(gpus):
        raise UserError(
            f"--gpus {','.join(map(str, gpus))} lists a GPU twice; use --workers-per-gpu K "
            "to put several workers on one GPU"
        )
    return [visible[g] for g in gpus]


def plan_placement(
    n_workers: int | None,
    visible: Sequence[str],
    gpus: Sequence[int] | None = None,
    per_gpu: int | None = None,
) -> list[dict[str, str]]:
    """One environment update per worker process: ``{"CUDA_VISIBLE_DEVICES": entry}``,
    round-robin over the allowed GPUs, or ``{}`` each when no GPU is visible.

    ``n_workers`` None (no ``--workers``): allowed GPUs × ``per_gpu`` when ``--gpus`` or
    ``--workers-per-gpu`` is given, else 1. With ``per_gpu``, more workers than
    allowed GPUs × ``per_gpu`` is refused rather than silently overloading a GPU."""
    if n_workers is not None and n_workers < 1:
        raise UserError(f"--workers {n_workers}: give at least 1")
    if per_gpu is not None and per_gpu < 1:
        raise UserError(f"--workers-per-gpu {per_gpu}: give at least 1")
    if not visible:
        flag = "--gpus" if gpus is not None else "--workers-per-gpu" if per_gpu else None
        if flag:
            parent = os.environ.get(CUDA_VISIBLE)
            seen = "torch sees none" if parent is None else f"CUDA_VISIBLE_DEVICES={parent!r}"
            raise UserError(
                f"{flag}: no GPU is visible on this machine ({seen}); drop {flag} to run on "
                "the CPU, with --workers N for several workers"
            )
        return [{} for _ in range(n_workers or 1)]
    allowed = _allowed(visible, gpus)
    if n_workers is None:
        n_workers = len(allowed) * (per_gpu or 1) if gpus is not None or per_gpu else 1
    if per_gpu and n_workers > len(allowed) * per_gpu:
        raise UserError(
            f"--workers {n_workers} with --workers-per-gpu {per_gpu} needs "
            f"{-(-n_workers // per_gpu)} GPUs, and {len(allowed)} are allowed; raise "
            "--workers-per-gpu, allow more --gpus, or give fewer --workers"
        )
    return [{CUDA_VISIBLE: allowed[i % len(allowed)]} for i in range(n_workers)]


def placement_for(
    device: str,
    n_workers: int | None,
    gpus: Sequence[int] | None = None,
    per_gpu: int | None = None,
) -> list[dict[str, str]]:
    """:func:`plan_placement` on this machine for a study training on ``device``
    (``train.device``): with ``cpu`` no GPU is handed out, and GPU flags are refused."""
    if device == "cpu":
        for flag, value in (("--gpus", gpus), ("--workers-per-gpu", per_gpu)):
            if value is not None:
                raise UserError(
                    f"{flag}: this study trains on the CPU (train.device=cpu); drop {flag} or "
                    "set train.device=auto"
                )
        return plan_placement(n_workers, [], None, None)
    return plan_placement(n_workers, visible_gpus(), gpus, per_gpu)


def describe(placement: Sequence[Mapping[str, str]]) -> str:
    """``4 workers on GPUs 0, 1 (w0→0, w1→1, w2→0, w3→1)``; ``""`` without GPUs."""
    entries = [p.get(CUDA_VISIBLE) for p in placement]
    if not any(entries):
        return ""
    gpus = ", ".join(dict.fromkeys(e for e in entries if e))
    each = ", ".join(f"w{i}→{e}" for i, e in enumerate(entries))
    return f"{len(entries)} worker(s) on GPU(s) {gpus} ({each}; CUDA_VISIBLE_DEVICES per worker)"
