"""Device, precision and thread choices shared by every command."""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sequencer.choices import AMP_DTYPES
from sequencer.errors import UsageError


def import_device_modules(modules: Iterable[str] | None) -> None:
    """Import --device-modules before any device is named or checked, as timm's train.py does: an out-of-tree backend
    registers its device (torch.utils.rename_privateuse1_backend) on import. One that cannot be imported: a
    `UsageError`."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except (ImportError, ValueError) as error:  # ValueError: an empty name
            raise UsageError(f"--device-modules: cannot import {module} ({error})") from None


def resolve_device(name: str | None = None) -> torch.device:
    """The named device, or CUDA when available, else the CPU; a clear error for an unusable name."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch's message lists every device type it knows
        raise UsageError(f"unknown device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu")
    return device


def amp_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """The autocast dtype: float16 on GPUs, bfloat16 on CPUs (where float16 autocast is slow), unless given."""
    if dtype:
        return getattr(torch, dtype)
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def check_amp(device_name: str | None, dtype: str | None) -> None:
    """Refuse in one line (`UsageError`) an AMP dtype that autocast cannot run on the device, naming those it can."""
    device = resolve_device(device_name)
    chosen = dtype or str(amp_dtype(device)).removeprefix("torch.")
    runnable = [name for name in AMP_DTYPES if _autocast_runs(device, getattr(torch, name))]
    if chosen not in runnable:
        raise UsageError(
            f"--amp in {chosen} cannot run on {device}: autocast there runs {' or '.join(runnable) or 'neither'} "
            f"({'pass --amp-dtype ' + runnable[0] if runnable else 'leave --amp out'})"
        )


def _autocast_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on `device` computes in `dtype` (it warns and switches itself off, or raises, where not)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=dtype):
                return torch.is_autocast_enabled(device.type)
        except RuntimeError:
            return False


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, Arm `Features`); None where it cannot be
    read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith(("flags", "Features"))), None)


def native_bfloat16_cpu() -> bool | None:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16), from /proc/cpuinfo; None
    where that cannot be read."""
    flags = cpu_flags()
    return None if flags is None else bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def warn_if_emulated_bfloat16(device: torch.device, dtype: str | None = None) -> None:
    """One warning when --amp asks for bfloat16 on a CPU that only emulates it, where it runs slower than float32."""
    if device.type == "cpu" and amp_dtype(device, dtype) == torch.bfloat16 and native_bfloat16_cpu() is False:
        warnings.warn(
            "--amp on this CPU (no AVX512-BF16 or AMX) emulates bfloat16: 3-4.6x slower than float32 here, as "
            "measured; leave --amp out for speed",
            UserWarning,
            stacklevel=2,
        )


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity where the OS reports it), as torch's DataLoader counts."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def autocast(device: torch.device, enabled: bool, dtype: str | None = None) -> contextlib.AbstractContextManager:
    """torch.autocast for the device when `enabled`, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device, dtype))


def progress_bar(iterable: Iterable | None = None, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that is drawn only on a terminal, so that piped logs keep just the result lines, and not
    at all unless `show`; it clears itself when done unless `leave=True`."""
    return tqdm(iterable, disable=None if show else True, leave=kwargs.pop("leave", False), **kwargs)


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads when asked."""
    if threads:
        torch.set_num_threads(threads)


def compile_model(model: nn.Module, backend: str, mode: str | None = None) -> nn.Module:
    """`torch.compile(model, backend=backend, mode=mode)`; unknown backends refused.

    Compiled, a Sequencer's recurrences run as the `sequencer::rnn2d` op (`sequencer.recurrence`): one graph.
    """
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UsageError(f"unknown torch.compile backend {backend!r}; expected one of {', '.join(known)}")
    return torch.compile(model, backend=backend, mode=mode)
