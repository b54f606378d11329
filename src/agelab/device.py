"""Where and in which precision a model runs: the device, bf16 autocast, exact fp32,
``torch.compile``.

* :func:`resolve_device` — ``auto`` is CUDA when torch can use it, else the CPU; on a machine
  with an NVIDIA GPU that torch cannot use (typically a driver older than the CUDA build of
  the torch wheel) ``auto`` warns, naming both versions, instead of training on the CPU
  without a word; ``cuda`` there is a :class:`~agelab.errors.DeviceError` saying what to do.
* :func:`autocast` — bf16 autocast for ``train.amp``: ``true`` on CUDA only, ``"bf16"`` on
  any device (the CPU included: fast on CPUs with bf16 units, and how the CUDA path's
  precision is reproduced on a machine without a GPU), ``false`` never.
* :func:`exact_fp32` — no TF32 in cuDNN convolutions for the duration (predictions with
  ``amp: false`` are fp32, not TF32).
* :func:`compile_model` — ``torch.compile`` of one model at a time: dynamo's caches hang on
  the code of ``AgeRegressor.forward``, shared by every model, so compiling trial after trial
  in one process filled its recompile limit (8) after about four architectures and the rest
  ran uncompiled without a word. A model other than the last one compiled drops the caches
  first; :func:`compile_guard` turns a recompile-limit hit inside one ``fit`` into an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from agelab.errors import DeviceError

__all__ = [
    "COMPILE_BACKEND",
    "autocast",
    "compile_guard",
    "compile_model",
    "cuda_unusable_reason",
    "exact_fp32",
    "nvidia_driver_version",
    "resolve_device",
    "uses_bf16",
]

#: ``torch.compile`` backend; ``AGELAB_COMPILE_BACKEND=aot_eager`` (or ``eager``) runs the
#: compile path without a C compiler or a GPU (the CPU tests use it), inductor otherwise.
COMPILE_BACKEND = os.environ.get("AGELAB_COMPILE_BACKEND", "inductor")

_GPU_NODE = Path("/dev/nvidia0")
_DRIVER_FILE = Path("/proc/driver/nvidia/version")
# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  …" or "… Open Kernel Module
# for x86_64  550.54.14  …"
_DRIVER_LINE = re.compile(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)")


# ------------------------------------------------------------------------------ device


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``, else
    ``nvidia-smi``), or None when there is none or it cannot be read."""
    try:
        found = _DRIVER_LINE.search(_DRIVER_FILE.read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""
    return first if out.returncode == 0 and first else None


def _gpu_present() -> bool:
    """An NVIDIA GPU device node or ``nvidia-smi`` on this machine."""
    return _GPU_NODE.exists() or shutil.which("nvidia-smi") is not None


def _init_error() -> str:
    """Why torch's CUDA initialisation fails, in torch's words (first line), or ''."""
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError/AssertionError with the reason
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ""


def cuda_unusable_reason() -> str | None:
    """When this machine has an NVIDIA GPU that torch cannot use: a sentence naming the
    torch build's CUDA version and the driver's, and what to do. None when CUDA works, or
    when there is no sign of a GPU (a CPU machine), or torch is a CPU-only build."""
    if torch.cuda.is_available() or not _gpu_present():
        return None
    driver = nvidia_driver_version() or "unknown (nvidia-smi found none)"
    wheel = torch.version.cuda
    if wheel is None:
        return (
            f"this machine has an NVIDIA GPU (driver {driver}) but torch {torch.__version__} "
            "is a CPU-only build; install a CUDA build of torch to use it"
        )
    why = _init_error()
    return (
        f"this machine has an NVIDIA GPU but torch {torch.__version__} (built for CUDA "
        f"{wheel}) cannot use it with NVIDIA driver {driver}"
        + (f" ({why})" if why else "")
        + f": update the driver to one that supports CUDA {wheel}, or install a torch build "
        "for the CUDA version the driver supports (nvidia-smi shows it), or set "
        "train.device=cpu"
    )


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → cuda when torch can use it, else cpu (with a warning when a GPU is there
    but unusable); ``cuda`` without a usable GPU raises :class:`DeviceError`."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        reason = cuda_unusable_reason()
        if reason:
            warnings.warn(f"train.device=auto runs on the CPU: {reason}", stacklevel=2)
        return torch.device("cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        reason = cuda_unusable_reason() or (
            f"torch {torch.__version__} sees no CUDA GPU on this machine"
            + ("" if torch.version.cuda else " (a CPU-only build)")
            + "; set train.device=auto or cpu, or run on a machine with an NVIDIA GPU"
        )
        raise DeviceError(f"train.device={name} but CUDA is not usable: {reason}")
    return torch.device(name)


# --------------------------------------------------------------------------- precision


def uses_bf16(device: torch.device, amp: bool | str) -> bool:
    """Whether ``train.amp`` means bf16 autocast on ``device``: ``true`` on CUDA,
    ``"bf16"`` on CUDA and the CPU, ``false`` nowhere."""
    if amp == "bf16":
        return device.type in ("cuda", "cpu")
    return bool(amp) and device.type == "cuda"


def autocast(device: torch.device, amp: bool | str) -> torch.autocast:
    """The bf16 autocast context of ``train.amp`` on ``device`` (disabled when it is off)."""
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=uses_bf16(device, amp))


@contextlib.contextmanager
def exact_fp32(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """On CUDA, cuDNN convolutions in IEEE fp32 instead of TF32 for the duration (torch's
    default lets them round to TF32's 10-bit mantissa). A no-op elsewhere, when not
    ``enabled``, and when the caller has set TF32 through torch's newer per-operator API
    (left as they chose)."""
    if device.type != "cuda" or not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    try:
        previous = cudnn.allow_tf32
    except RuntimeError:  # conv and RNN set apart through the new API: the caller's choice
        yield
        return
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = previous


# ----------------------------------------------------------------------------- compile

_last_compiled: list[weakref.ref] = []  # the model compile_model last compiled


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model, dynamic=False)`` with :data:`COMPILE_BACKEND`.

    Dynamo keys its caches on the code object of ``forward`` — one for every
    :class:`~agelab.models.AgeRegressor` — so graphs of earlier models count against the
    recompile limit of later ones. When ``model`` is not the model compiled last, the caches
    are dropped first (``torch._dynamo.reset()``): each trial's model gets its own graphs
    (and the previous model's are freed); fitting the same model again reuses them.
    ``dynamic=False``: one static graph per batch shape (a full and a last eval batch)."""
    last = _last_compiled[0]() if _last_compiled else None
    if last is not model:
        torch._dynamo.reset()
        _last_compiled[:] = [weakref.ref(model)]
    return torch.compile(model, dynamic=False, backend=COMPILE_BACKEND)


@contextlib.contextmanager
def compile_guard(enabled: bool) -> Iterator[None]:
    """While a compiled model trains: hitting dynamo's recompile limit raises instead of
    running the rest uncompiled (which would skew the trial's speed without a word)."""
    if not enabled:
        yield
        return
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        with dynamo_config.patch(fail_on_recompile_limit_hit=True):
            yield
    except FailOnRecompileLimitHit as exc:
        raise RuntimeError(
            "torch.compile hit its recompile limit "
            f"(torch._dynamo.config.recompile_limit = {dynamo_config.recompile_limit}) in one "
            "fit: the rest would have run uncompiled, at another speed. Run with "
            'TORCH_LOGS="recompiles" to see why it recompiled, or set train.compile=false'
        ) from exc
