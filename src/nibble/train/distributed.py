"""Many processes under ``torchrun``: the process group, each rank's device, the collectives a run needs, and
the data-parallel engines (DDP for the LoRA methods, FSDP2 for full fine-tuning and for a LoRA method's sharded
base).

A run started by ``torchrun`` finds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment; without
them (or with a world of one) it is the single-process run and every helper here is a no-op. The global batch
is ``batch_size x grad_accum x world``: every rank draws the same seeded order of examples and takes its
slice of each global micro-batch (see :class:`nibble.data.batching.BatchStream`), so the examples a step sees
are those of a one-process run with the global batch.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nibble.data.batching import Dataset, iter_batches
from nibble.devices import return_large_blocks_to_os
from nibble.errors import NibbleError

BACKENDS = ("auto", "gloo", "nccl")
# How long the ranks of a launch wait for each other to arrive; collectives then wait COLLECTIVE_TIMEOUT (rank 0
# may write a checkpoint or evaluate while the others wait).
JOIN_TIMEOUT = timedelta(minutes=10)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_LAUNCH = "launch the ranks with torchrun --nproc-per-node N"


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
        NibbleError: one of the variables is not a non-negative integer, ``WORLD_SIZE`` is 0, or ``RANK`` or
            ``LOCAL_RANK`` is not below it (``WORLD_SIZE=1 RANK=1`` once ran as a rank that writes nothing).
    """
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(key, "0")
        if not raw.isdigit():
            raise NibbleError(f"environment variable {key}={raw!r} is not a rank number; {_LAUNCH}")
        values[key] = int(raw)
    world = values["WORLD_SIZE"]
    if world < 1:
        raise NibbleError(f"environment variable WORLD_SIZE=0: a launch has at least one rank; {_LAUNCH}")
    for key in ("RANK", "LOCAL_RANK"):
        if values[key] >= world:
            raise NibbleError(
                f"environment variables {key}={values[key]} and WORLD_SIZE={world}: ranks run from 0 to "
                f"{world - 1}; {_LAUNCH} (or unset WORLD_SIZE, RANK and LOCAL_RANK for one process)"
            )
    return Parallel(values["RANK"], world, values["LOCAL_RANK"])


def _master() -> tuple[str, int]:
    """``MASTER_ADDR`` and ``MASTER_PORT``, where the ranks meet.

    Raises:
        NibbleError: one is unset or the port is not a port number.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    for key, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port)):
        if not value:
            raise NibbleError(
                f"environment variable {key} is not set, and WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several "
                f"ranks that meet there; {_LAUNCH}, which sets it"
            )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise NibbleError(f"environment variable MASTER_PORT={port!r} is not a port number (1-65535); {_LAUNCH}")
    return addr, int(port)


def _join(part: Parallel) -> dist.Store:
    """The store every rank of ``part`` meets at, once all of them have arrived within :data:`JOIN_TIMEOUT`.

    Rank 0 hosts it (unless torchrun's agent does) and waits for the others; the others wait for it to answer.
    A rank that never comes is one line after the timeout, never a silent hang.

    Raises:
        NibbleError: no environment to meet in, or a rank that did not arrive in time.
    """
    addr, port = _master()
    wait = int(JOIN_TIMEOUT.total_seconds())
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # (torchrun's agent hosts it and counts ranks)
    host = part.is_main and not agent
    if not host:
        deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
        while True:  # (probed here: torch's own client retries for the whole timeout, logging a trace each time)
            try:
                socket.create_connection((addr, port), timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise NibbleError(
                        f"rank {part.rank} of {part.world}: nothing answered at MASTER_ADDR:MASTER_PORT "
                        f"{addr}:{port} within {wait} s (rank 0 never started, or listens elsewhere); {_LAUNCH}"
                    ) from None
                time.sleep(0.5)
    try:
        # (each rank counts itself in with wait_for_workers; only the host waits for the count)
        store = dist.TCPStore(addr, port, part.world, host, JOIN_TIMEOUT, wait_for_workers=not agent)
    except (dist.DistError, RuntimeError) as exc:  # (torch says "1/2 clients joined")
        joined = re.search(r"(\d+)/\d+ clients joined", str(exc))
        arrived = f"only {joined.group(1)} of {part.world} ranks" if joined else f"not all {part.world} ranks"
        raise NibbleError(
            f"rank {part.rank}: {arrived} arrived at {addr}:{port} within {wait} s; the others never started "
            f"or meet elsewhere; {_LAUNCH}"
        ) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    return dist.PrefixStore(f"nibble-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
    ``backend`` names one. Ranks other than 0 stop printing to stdout (see :func:`quiet_other_ranks`).

    Raises:
        NibbleError: NCCL asked for without a CUDA device, an unknown backend, or ranks that do not meet (see
            :func:`_join`).
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
    store = _join(part)
    dist.init_process_group(
        backend, store=store, rank=part.rank, world_size=part.world, timeout=COLLECTIVE_TIMEOUT, **kwargs
    )
    global _host_group
    _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    quiet_other_ranks(part)


def quiet_other_ranks(part: Parallel) -> None:
    """Ranks other than 0 stop printing to stdout, for the life of the process (rank 0 speaks for every rank;
    errors still reach stderr). Called before a run reads anything, so its data lines come from rank 0 alone."""
    if not part.is_main and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the life of the process)


def stop() -> None:
    """Leave the process group (if this process joined one)."""
    global _host_group
    _host_group = None
    if dist.is_initialized():
        # A DDP wrapper left in a reference cycle would otherwise be collected after the group is gone (or at
        # exit), and its reducer's teardown can then abort the process ("terminate called", seen once in CI).
        gc.collect()
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


# Host values (a stop flag) are reduced over gloo, on the CPU, so that agreeing on them never waits for the device:
# the default group under gloo, a group of its own beside NCCL.
_host_group: dist.ProcessGroup | None = None


def host_sum(values: list[float]) -> list[float]:
    """``values`` (host numbers, the same count on every rank) summed over the ranks, on the host: one gloo
    all-reduce that never waits for a device (``values`` itself in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(summed, group=_host_group)
    return summed.tolist()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (``flag`` itself in a single process), agreed on the host."""
    return host_sum([float(flag)])[0] > 0


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
    mine = torch.tensor(list(json.dumps(config, sort_keys=True, default=str).encode()), dtype=torch.uint8)
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
        # Every buffer is ignored above, so no buffer is synced either way; torch 2.13 renamed broadcast_buffers
        # (which it now warns about on every rank) to forward_sync_buffers.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        self.ddp = DistributedDataParallel(
            wrapped, device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync
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


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (the others' argument is ignored)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return text
    mine = text.encode() if dist.get_rank() == 0 else b""
    return bytes(gather_parts(torch.tensor(list(mine), dtype=torch.uint8))[0].tolist()).decode()


def shard_model(model: nn.Module, device: torch.device, gather_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over every rank, computing on ``device``: each decoder block is its own unit, and so are the
    embeddings unless a head shares them; the root holds the rest (final norm, head). Parameters, gradients and
    the optimizer state built on them are sharded; the gradients reduce in fp32. Frozen parameters (a LoRA
    method's base) are sharded too and only ever gathered.

    Without ``gather_dtype`` parameters are gathered in their stored precision and compute runs under the run's
    autocast, as in a single process, so a sharded run takes the same steps as one process with the global batch.
    With it (full fine-tuning in bf16 or fp16: the fp32 master weights stay sharded) every floating-point
    parameter is gathered in that dtype, half the bytes, and its gradient is computed in it, then reduced and
    accumulated in fp32. Matmuls read the same rounded weights autocast would give them; norms, routers and the
    delta rule's gates read 16-bit weights where one process reads fp32 ones, and the embedding lookup is cast
    back to fp32 so that the residual stream stays fp32 as in one process (block inputs are not cast down).
    ``hidden_states`` counts as a forward of the root (the instruct loss calls it, then the head), and the root
    keeps its parameters gathered after a forward so the head can run after it.

    A 4-bit base (QLoRA) is sharded as bytes: every 4-bit weight (each :class:`~nibble.nn.quant_linear.QuantLinear`
    and each sparse layer's experts) first holds its packed data and block scales as uint8 parameters, output rows
    first (see :meth:`~nibble.nn.quant_linear.HeldWeight.hold_as_parameters`), so each rank keeps ~1/world of them; a
    block's are all-gathered before its forward and again before its backward (grad_x needs W), the kernels run on
    the weight rebuilt over the gathered bytes, and they are freed after. A model loaded on the host for an
    accelerator ``device`` moves there one unit at a time as it is sharded: the device never holds it whole.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from nibble.nn.quant_linear import HeldWeight

    for layer in model.modules():
        if isinstance(layer, HeldWeight):
            layer.hold_as_parameters()
    if device.type == "cpu":
        # FSDP2 frees every unit's gathered 4-bit bytes after its forward and backward: blocks of ~100 KiB and up
        # that glibc's heap would otherwise keep (a 660M-parameter NF4 base on 2 ranks: rank 0 at 1.80 GB after
        # 3 steps and growing, against 0.61 GB, flat, with each such block mapped on its own).
        return_large_blocks_to_os(128 << 10)
    # cast_forward_inputs=False: a block's fp32 input (the residual stream) is not cast to gather_dtype
    policy = MixedPrecisionPolicy(param_dtype=gather_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    embed, head = model.model.embed_tokens, getattr(model, "lm_head", None)
    if gather_dtype is not None:  # (a hook, not the policy's output_dtype: a tied embedding is part of the root)
        embed.register_forward_hook(lambda _module, _args, out: out.float())
    own_unit = head is None or head.weight is not embed.weight  # (a tied head needs it after the blocks too)
    if own_unit:  # gathered for the lookup alone, not kept with the root's parameters for the whole step
        fully_shard(embed, mesh=mesh, mp_policy=policy)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if own_unit:
        # The first block's backward would prefetch the unit before it, the embeddings, which a backward gathers
        # only when they train (then by their own hook): it "prefetches" the root instead, gathered already.
        # (SmolLM2-135M, fp32 embeddings of 113 MB: the backward's peak RSS 200 MB lower.)
        model.model.layers[0].set_modules_to_backward_prefetch([model])
    register_fsdp_forward_method(model, "hidden_states")


def sync_gradients(model: nn.Module, sync: bool) -> None:
    """Whether the next backward of an FSDP2-sharded ``model`` reduce-scatters its gradients (``sync``) or adds
    them to the whole, unsharded gradients it accumulates in fp32 (the micro-batches before the last of a step,
    as :meth:`DataParallel.no_sync`): one reduce-scatter per step instead of one per micro-batch, for the memory of
    one process's fp32 gradients while the step accumulates. Nothing for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def is_sharded(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a parameter sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor that may be a DTensor (a collective for DTensors: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def gathered(model: nn.Module, trainable_only: bool = False) -> Iterator[None]:
    """Inside, an FSDP2-sharded ``model`` holds its whole parameters on every rank, in their stored dtype (the fp32
    master weights, also where forwards gather them in 16 bits), for an export by rank 0; resharded on the way
    out. With ``trainable_only``, only the parameters that train are gathered (a LoRA method's adapters and head:
    the frozen base, which may not fit one device, stays sharded). Nothing happens for a model that is not
    sharded. Every rank must enter."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for unit in model.modules():  # (the root keeps what its last forward gathered: its sharded parameters back)
        if isinstance(unit, FSDPModule):
            unit.reshard()
    sharded = [
        (module, name, param)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if isinstance(param, DTensor) and (param.requires_grad or not trainable_only)
    ]
    whole: dict[int, nn.Parameter] = {}  # one parameter for a tied one
    for module, name, param in sharded:  # the same order on every rank: one all-gather each
        if id(param) not in whole:
            # still marked as it was: an export tells what trains by it (a router is saved only when it trains)
            whole[id(param)] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
        module._parameters[name] = whole[id(param)]
    try:
        yield
    finally:
        barrier()
        for module, name, param in sharded:
            module._parameters[name] = param


def eval_batches(
    data: Dataset,
    batch_size: int,
    pad_id: int,
    batches: Callable[[range], Iterable[tuple[Sequence[int], dict[str, torch.Tensor]]]] | None = None,
) -> Iterator[tuple[Sequence[int], dict[str, torch.Tensor]]]:
    """This rank's share of ``data`` in batches: ``batches(rows)`` (default: file order, see
    :func:`nibble.data.batching.iter_batches`). Under torchrun every rank yields the same number of batches, so a
    sharded model's collectives line up: a rank whose rows ran out gets a stand-in batch (the data's first row)
    with no rows, to run and ignore."""
    part = current()
    rows = shard_range(len(data))
    if batches is None:
        mine = data if len(rows) == len(data) else data.subset(np.asarray(rows, dtype=np.int64))
        batches = lambda _: iter_batches(mine, batch_size, pad_id)  # noqa: E731
    count = 0
    for chunk, batch in batches(rows):
        count += 1
        yield chunk, batch
    most = math.ceil(math.ceil(len(data) / part.world) / batch_size)  # rank 0 holds the most rows
    for _ in range(most - count):
        yield range(0), data.collate([0], pad_id)
