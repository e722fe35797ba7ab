"""The one dispatch point for 4-bit matmuls: Triton kernels on CUDA, the torch reference elsewhere.

``NIBBLE_KERNELS`` chooses: ``auto`` (default: Triton for CUDA tensors when it imports, else torch),
``torch`` (always the reference) or ``triton`` (always Triton; with ``TRITON_INTERPRET=1`` this runs
on CPU tensors, which is how the kernels are tested without a GPU). It is read once, at the first
matmul; ``set_backend`` and ``use_backend`` override it from code.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from types import ModuleType

import torch

from nibble.errors import NibbleError, first_line
from nibble.kernels import reference
from nibble.quant.base import QuantizedWeight

BACKENDS = ("auto", "torch", "triton")
# The formats the Triton kernels read; others (GGUF block types) always take the torch reference.
TRITON_FORMATS = ("nf4", "int4")


# The oldest Triton the kernels can compile on: the first whose ``tl.dot`` takes ``input_precision``, which every
# kernel passes (older ones spell it ``allow_tf32``). ``triton.knobs`` (newer still) is read only where it exists.
# The kernels were run on newer Tritons only; benchmarks/gpu_check.sh prints the one a GPU session has. With an
# older Triton, or one that fails to import, the torch reference runs (one note says so on CUDA) instead of every
# CUDA 4-bit matmul failing.
MIN_TRITON = (3, 0)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"3.9.0"`` / ``"3.3.0+git1234"`` / ``"3.4.0rc1"`` -> ``(3, 9, 0)`` / ``(3, 3, 0)`` / ``(3, 4, 0)``."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run here (Triton missing, broken or too old), or None when they can."""
    try:
        import triton
    except ModuleNotFoundError as exc:
        if exc.name == "triton":
            return "Triton is not installed (pip install triton)"
        return f"Triton does not import ({first_line(exc)})"
    except Exception as exc:  # a broken install raises anything: a missing driver library, a torch mismatch
        return f"Triton does not import ({type(exc).__name__}: {first_line(exc)})"
    version = getattr(triton, "__version__", "0")
    if version_tuple(str(version)) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"Triton {version} is older than the {need} nibble's kernels need (pip install -U triton)"
    return None


def _note(reason: str) -> None:
    if torch.cuda.is_available():
        print(f"note: {reason}; 4-bit matmuls run the torch reference", file=sys.stderr)


_unusable: str | None = None  # why the Triton kernels did not load (set by _triton_ops)


@cache
def _triton_ops() -> ModuleType | None:
    """The Triton kernels, or None (with one note on a CUDA machine) where they cannot load."""
    global _unusable
    _unusable = triton_unavailable()
    if _unusable is None:
        try:
            return importlib.import_module("nibble.kernels.triton_ops")
        except Exception as exc:  # a Triton that imports but lacks what the kernels use
            _unusable = f"nibble's Triton kernels do not load ({type(exc).__name__}: {first_line(exc)})"
    _note(_unusable)
    return None


# The validated choice: set in code, or read from NIBBLE_KERNELS at first use; None = not read yet.
_choice: str | None = None


def _validated(name: str, source: str) -> str:
    choice = name.strip().lower() or "auto"
    if choice not in BACKENDS:
        raise NibbleError(f"{source}{choice!r} is not valid; use one of {', '.join(BACKENDS)}")
    return choice


def set_backend(name: str | None) -> None:
    """Choose the kernels from code: ``"auto"``, ``"torch"`` or ``"triton"``; ``None`` goes back to ``NIBBLE_KERNELS``.

    Raises:
        NibbleError: a name not in ``BACKENDS``.
    """
    global _choice
    _choice = None if name is None else _validated(name, "kernel backend ")


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """``set_backend(name)`` inside the block; the previous choice is restored on exit."""
    global _choice
    previous = _choice
    set_backend(name)
    try:
        yield
    finally:
        _choice = previous


def _chosen() -> str:
    """The choice set in code, else ``NIBBLE_KERNELS`` (read on first use; an invalid value raises NibbleError)."""
    global _choice
    if _choice is None:
        _choice = _validated(os.environ.get("NIBBLE_KERNELS", "auto"), "NIBBLE_KERNELS=")
    return _choice


def backend_name(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: ``"torch"`` or ``"triton"``."""
    choice = _chosen()
    if choice == "torch":
        return "torch"
    available = _triton_ops() is not None
    if choice == "triton":
        if not available:
            raise NibbleError(f"NIBBLE_KERNELS=triton but {_unusable}")
        return "triton"
    return "triton" if available and device.type == "cuda" else "torch"


def _ops(device: torch.device, qweight: QuantizedWeight) -> ModuleType:
    if qweight.format in TRITON_FORMATS and backend_name(device) == "triton":
        return _triton_ops()
    return reference


# Dense matmuls (a cached dequantized weight, LoRA, a head) run the torch way on every device.
linear = reference.linear
on_fp32_units = reference.on_fp32_units
fp32_units_reason = reference.fp32_units_reason
attention_on_fp32_units = reference.attention_on_fp32_units


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``."""
    return _ops(qweight.device, qweight).dequantize(qweight, dtype)


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W)[N, K]^T (+ bias) -> [M, N]``, in ``x.dtype``."""
    return _ops(x.device, qweight).matmul(x, qweight, bias)


def tuning_time() -> tuple[float, int]:
    """Seconds the Triton kernels' autotuners spent so far in this process and how many shapes they tuned (see
    ``triton_common.tuning_time``); ``(0.0, 0)`` where the Triton kernels have not been loaded."""
    common = sys.modules.get("nibble.kernels.triton_common")
    return (0.0, 0) if common is None else common.tuning_time()


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ dequant(W)[N, K] -> [M, K]``, in ``grad_y.dtype``."""
    return _ops(grad_y.device, qweight).matmul_grad_input(grad_y, qweight)
