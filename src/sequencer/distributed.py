"""torch.distributed set-up for training under torchrun: one process per GPU (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sequencer.errors import UsageError
from sequencer.runtime import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among `world_size` processes and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 outside torchrun; known before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device_name: str | None = None) -> Iterator[DistributedContext]:
    """This process's place in torchrun's group, joined from its environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*),
    or alone outside torchrun; the group torn down on exit."""
    device = resolve_device(device_name)
    if launched_world_size() <= 1:
        context = DistributedContext(0, 1, device)
    else:
        if device.type == "cuda":
            # One GPU per process: the local rank picks it, whatever index the flag named.
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        check_restartable()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
        context = DistributedContext(dist.get_rank(), dist.get_world_size(), device)
    try:
        yield context
    finally:
        cleanup_distributed()


def check_restartable() -> None:
    """Refuse a torchrun launch with --max-restarts whose agent shares its rendezvous store with the workers (the
    static rendezvous always does; c10d unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1).

    A restarted group would read the addresses the group before it left in that store and fail or hang while
    connecting (seen here with gloo in 3 of 4 restarts; NCCL: pytorch/pytorch#135712)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) <= 0:
        return
    problem = (
        "torchrun --max-restarts shares its rendezvous store with the workers, and a restarted group would read the "
        "addresses of the one before"
    )
    c10d = "--standalone (one node) or --rdzv-backend c10d --rdzv-endpoint HOST:PORT"
    # c10d honours the switch; the static rendezvous (torchrun's default backend) shares its store whatever it says.
    if os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1":
        raise UsageError(
            f"{problem}: its static rendezvous shares it whatever TORCH_DISABLE_SHARE_RDZV_TCP_STORE says; "
            f"launch it with {c10d}"
        )
    raise UsageError(f"{problem}: launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment and {c10d}")


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of `value` over all processes (the value itself when alone)."""
    if not context.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / context.world_size


def all_reduce_sum(value: int, context: DistributedContext) -> int:
    """The sum of a count over all processes (the count itself when alone)."""
    if not context.distributed:
        return value
    total = torch.tensor(value, dtype=torch.int64, device=context.device)
    dist.all_reduce(total)
    return int(total.item())


def all_reduce_max(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The elementwise maximum of `value` over all processes (the value itself when alone)."""
    if not context.distributed:
        return value
    value = value.to(context.device, copy=True)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def on_every_rank(flag: bool, context: DistributedContext) -> bool:
    """Whether `flag` holds in every process (the flag itself when alone)."""
    return all_reduce_sum(int(flag), context) == context.world_size


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
