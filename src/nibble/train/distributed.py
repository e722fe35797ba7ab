"""Many processes under ``torchrun``: the process group, each rank's device, the collectives a run needs, and
the data-parallel engines (DDP for the LoRA methods, FSDP2 for full fine-tuning).

A run started by ``torchrun`` finds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment; without
them (or with a world of one) it is the single-process run and every helper here is a no-op. The global batch
is ``batch_size x grad_accum x world``: every rank draws the same seeded order of examples and takes its
slice of each global micro-batch (see :class:`nibble.data.batching.BatchStream`), so the examples a step sees
are those of a one-process run with the global batch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nibble.errors import NibbleError

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Parallel:
    """This process's place among the ranks of a run: ``rank`` of ``world`` (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this rank prints, logs and writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Parallel()


def from_environment() -> Parallel:
    """The torchrun placement of this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or :data:`SINGLE`.

    Raises:
        NibbleError: one of the variables is not a non-negative integer.
    """
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(key, "0")
        if not raw.isdigit():
            raise NibbleError(f"environment variable {key}={raw!r} is not a rank number; launch with torchrun")
        values[key] = int(raw)
    return Parallel(values["RANK"], max(values["WORLD_SIZE"], 1), values["LOCAL_RANK"])


def rank_device(device: str, part: Parallel) -> str:
    """The device a rank computes on: ``cuda`` (or ``auto`` with CUDA present) becomes ``cuda:LOCAL_RANK``.

    Raises:
        NibbleError: a fixed ``cuda:N`` under torchrun (every rank would share it).
    """
    if not part.active:
        return device
    if device.startswith("cuda:"):
        raise NibbleError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{part.local_rank}"
    return device


def start(part: Parallel, device: torch.device, backend: str) -> None:
    """Join the process group of ``part`` (nothing for a single process): NCCL on CUDA, gloo otherwise, unless
    ``backend`` names one. Ranks other than 0 stop printing to stdout (their errors still reach stderr).

    Raises:
        NibbleError: NCCL asked for without a CUDA device, or an unknown backend.
    """
    if not part.active or dist.is_initialized():
        return
    if backend not in BACKENDS:
        raise NibbleError(f"--dist-backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise NibbleError(
            f"--dist-backend nccl needs CUDA devices, this rank computes on {device}; use --dist-backend gloo (or auto)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=part.rank, world_size=part.world, timeout=timedelta(minutes=30), **kwargs)
    if not part.is_main:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the life of the process)


def stop() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Parallel:
    """The placement of this process in the process group it joined, or :data:`SINGLE`."""
    if not dist.is_initialized():
        return SINGLE
    return Parallel(dist.get_rank(), dist.get_world_size(), from_environment().local_rank)


def _comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (in place; unchanged in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if tensor.device == _comm_device():
            dist.all_reduce(tensor)
        else:
            moved = tensor.to(_comm_device())
            dist.all_reduce(moved)
            tensor.copy_(moved)
    return tensor


def barrier() -> None:
    """Wait until every rank got here."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` [n_r, ...], in rank order, on every rank (the rows may differ in number between
    ranks; the trailing shape and dtype may not)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [tensor]
    comm = _comm_device()
    counts = torch.zeros(dist.get_world_size(), dtype=torch.long, device=comm)
    counts[dist.get_rank()] = tensor.shape[0]
    dist.all_reduce(counts)
    padded = torch.zeros((int(counts.max()), *tensor.shape[1:]), dtype=tensor.dtype, device=comm)
    padded[: tensor.shape[0]] = tensor.to(comm)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return [p[: int(n)].to(tensor.device) for p, n in zip(parts, counts.tolist(), strict=True)]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated in rank order along dim 0 (see :func:`gather_parts`)."""
    return torch.cat(gather_parts(tensor))


def shard_range(count: int) -> range:
    """This rank's contiguous share of ``count`` items (sizes differ by at most one; all of them alone)."""
    part = current()
    base, extra = divmod(count, part.world)
    begin = part.rank * base + min(part.rank, extra)
    return range(begin, begin + base + (part.rank < extra))


def check_same_config(config: dict[str, Any]) -> None:
    """Raise on every rank when the ranks were started with different settings.

    Raises:
        NibbleError: naming the first key where a rank's config differs from rank 0's.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    mine = torch.frombuffer(bytearray(json.dumps(config, sort_keys=True, default=str).encode()), dtype=torch.uint8)
    configs = [json.loads(bytes(part.tolist()).decode()) for part in gather_parts(mine)]
    for rank, other in enumerate(configs[1:], start=1):
        for key in sorted(set(configs[0]) | set(other)):
            if configs[0].get(key) != other.get(key):
                raise NibbleError(
                    f"rank {rank} was started with {key}={other.get(key)!r}, rank 0 with {configs[0].get(key)!r}; "
                    "start every rank with the same command and config file"
                )


class _TaskForward(nn.Module):
    """A model and the task's forward as one module, so the data-parallel wrapper sees every forward."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(self.model, batch)


class DataParallel:
    """DDP over the trainable parameters of ``model`` (the frozen base, dense or 4-bit, is loaded by every rank
    from disk and never communicated); only their gradients are all-reduced, averaged over the ranks."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        from torch.nn.parallel import DistributedDataParallel

        wrapped = _TaskForward(model, forward)
        # Frozen weights are equal on every rank already (same files); broadcasting them would only cost time.
        wrapped._ddp_params_and_buffers_to_ignore = [  # read by DDP's constructor
            f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad
        ] + [f"model.{name}" for name, _ in model.named_buffers()]
        device = next(p.device for p in model.parameters() if p.requires_grad)
        self.ddp = DistributedDataParallel(
            wrapped, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.ddp(batch)

    def no_sync(self, skip: bool):
        """Inside: backward passes accumulate gradients without all-reducing them (the micro-batches before the
        last of a step)."""
        return self.ddp.no_sync() if skip else nullcontext()


@contextmanager
def main_first() -> Iterator[bool]:
    """Yields whether this is rank 0; the other ranks wait at the end until rank 0 is done inside."""
    part = current()
    try:
        yield part.is_main
    finally:
        barrier()
