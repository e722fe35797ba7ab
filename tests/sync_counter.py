"""Count operations that make the host wait for the device (data-dependent results read back)."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


class SyncCounter(TorchDispatchMode):
    """Record each device read-back: scalar reads, nonzero, boolean-mask indexing, masked_select, unique, and
    copies from a device to the host (``.cpu()``, ``.tolist()`` of a CUDA tensor; none exist in a CPU run)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNCING:
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            self.counts["boolean-mask indexing"] += 1
        elif name in ("_to_copy", "copy_") and _to_host(name, args, kwargs):
            self.counts["device-to-host copy"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _to_host(name, args, kwargs) -> bool:
    """Whether a copy op moves a tensor off a device onto the host."""
    if name == "_to_copy":
        source, target = args[0].device, torch.device(kwargs.get("device") or args[0].device)
    else:
        source, target = args[1].device, args[0].device
    return source.type != "cpu" and target.type == "cpu"
