"""Devices: which one a run computes on, its compute dtype, its memory, moving batches onto it, autocast.

``resolve_device`` turns ``auto|cpu|cuda|cuda:N|mps|xpu`` into a ``torch.device`` that exists (``auto``:
CUDA if available, then XPU, then MPS, else CPU); ``resolve_dtype`` turns ``auto|float32|bfloat16|float16``
into the compute dtype (``auto``: bfloat16 where the device computes it natively, float16 on CUDA GPUs
without bfloat16, float32 otherwise). Memory: free/total of a device, its peak allocation, and the peak
resident set size (RSS) of this process, which is what a CPU run uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch

from nibble.errors import NibbleError, first_line

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps or xpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU feature flags (/proc/cpuinfo) that mean native bfloat16 arithmetic: x86 AMX or AVX512-BF16, Arm BF16.
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return torch.backends.mps.is_available()


def _count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "xpu":
        return torch.xpu.device_count()
    return 1


def _current(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.current_device()
    if kind == "xpu":
        return torch.xpu.current_device()
    return 0


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device ``name`` asks for, checked to exist: ``auto`` (or None) picks CUDA, then XPU, then MPS, else CPU.

    Accelerators come back with an index (``cuda`` -> ``cuda:<current device>``), so the device prints the same
    everywhere; the CPU has none.

    Raises:
        NibbleError: a name that is not one of ``auto, cpu, cuda, cuda:N, mps, xpu``, or a device this machine
            does not have (one line that says what it has).
    """
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        kind = next((k for k in ("cuda", "xpu", "mps") if _available(k)), "cpu")
        return torch.device(kind) if kind == "cpu" else torch.device(kind, _current(kind))
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise NibbleError(f"device '{name}' is not valid; use {DEVICE_CHOICES}")
    if device.type == "cpu":
        return torch.device("cpu")
    if not _available(device.type):
        raise NibbleError(f"device '{name}': {_absent(device.type)}; use --device cpu or auto")
    index = _current(device.type) if device.index is None else device.index
    if index >= _count(device.type):
        raise NibbleError(
            f"device '{name}': this machine has {_count(device.type)} {device.type} device(s) "
            f"({device.type}:0 to {device.type}:{_count(device.type) - 1}); pick one of them or auto"
        )
    return torch.device(device.type, index)


def _absent(kind: str) -> str:
    if kind == "cuda":
        build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU was found"
        return f"CUDA is not available ({build}, torch {torch.__version__})"
    if kind == "xpu":
        return f"no Intel XPU is available (torch {torch.__version__})"
    return "MPS (Apple GPU) is not available on this machine"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in the text of /proc/cpuinfo (x86 ``flags``, Arm ``Features``)."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return found


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the one ``cpuinfo``, a /proc/cpuinfo text, describes) computes bfloat16 natively:
    AMX, AVX512-BF16 or Arm BF16.

    Elsewhere bfloat16 matmuls run too, but emulated and 5-50x slower than float32 (measured on an AVX2 EPYC:
    5 GFLOP/s against 26 for ``F.linear``, 1 against 24 for ``grad @ W``). For this CPU the environment
    variable :data:`CPU_BF16_ENV` (``1`` or ``0``) overrides what its flags say, so that either kind of CPU can
    run the code paths of the other (bf16 numerics are the same, only slower where emulated).
    """
    return _host_has_native_bf16() if cpuinfo is None else bool(cpu_flags(cpuinfo) & _BF16_FLAGS)


CPU_BF16_ENV = "NIBBLE_CPU_BF16"


@cache  # asked before every low-precision matmul on the CPU
def _host_has_native_bf16() -> bool:
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise NibbleError(f"environment variable {CPU_BF16_ENV}={forced!r}: use 1 (native bf16), 0 (none) or unset it")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_has_native_bf16(f.read())
    except OSError:
        return False


def under_memory_limit() -> bool:
    """Whether this process runs under a finite address-space or data-segment limit (``ulimit -v`` / ``-d``).

    Near such a limit oneDNN's run-time generated bf16 kernels were seen to crash the process (SIGSEGV, an
    AVX512-BF16 EPYC under RLIMIT_DATA) rather than raise, so nothing could fall back from them afterwards.
    """
    return any(resource.getrlimit(kind)[0] != resource.RLIM_INFINITY for kind in _MEMORY_LIMITS)


_MEMORY_LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_DATA)


# What oneDNN (the CPU kernels of torch's bf16 matmuls on native-bf16 CPUs) raises when it cannot build a kernel
# for a shape, or cannot allocate its code and scratch memory (seen under RLIMIT_DATA on an AVX512-BF16 EPYC).
_ONEDNN_FAILURES = ("could not create a primitive", "could not construct a memory descriptor", "onednn", "mkldnn")


def is_onednn_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is oneDNN failing to create or run a CPU kernel (not a bug in the caller's shapes)."""
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _ONEDNN_FAILURES)


def onednn_failure_message(exc: BaseException) -> str:
    """One line for a oneDNN failure that nothing could fall back from: what happened and what to change."""
    return (
        f"the CPU's low-precision kernels (oneDNN) failed: {first_line(exc)}; this happens when the process is "
        "near a memory limit or a shape is not supported: give it more memory, or rerun with --dtype float32"
    )


def auto_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype ``--dtype auto`` means on ``device``.

    bfloat16 on CUDA GPUs that compute it natively (compute capability 8.0+, or ROCm's equivalent), on XPUs
    that support it and on CPUs with native bfloat16; float16 (with a gradient scaler in training) on older
    CUDA GPUs; float32 everywhere else (MPS, CPUs without native bfloat16).
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if device.type == "xpu":
        return torch.bfloat16 if torch.xpu.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype ``name`` (``auto``, ``float32``, ``bfloat16``, ``float16`` or a torch dtype) means on
    ``device`` (see :func:`auto_dtype`).

    Raises:
        NibbleError: any other name.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise NibbleError(f"dtype {name} is not supported; use auto, {', '.join(DTYPES)}")
        return name
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise NibbleError(f"dtype '{name}' is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


THREADS_ENV = "NIBBLE_THREADS"
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE = 128  # primitives: a step's distinct matmul shapes, with room to spare (oneDNN's own default: 1024)


def bound_onednn_cache() -> None:
    """Keep at most :data:`ONEDNN_CACHE` oneDNN primitives (the CPU's bf16 matmul kernels, one per shape), unless
    ``$ONEDNN_PRIMITIVE_CACHE_CAPACITY`` says otherwise.

    Training batches pack their real tokens, so a matmul's row count changes with every batch and oneDNN keeps a
    primitive (code and buffers) for each one it has seen: on an AVX512-BF16 CPU, 75 steps of SmolLM2 QLoRA grew
    the resident set by ~350 MiB at its default of 1024, and a primitive of an earlier batch's shape is rarely
    used again. oneDNN reads the setting when it makes its first primitive, so this runs when nibble is imported.
    """
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE))


bound_onednn_cache()


def apply_threads(threads: int | None = None) -> None:
    """Set torch's CPU thread count to ``threads``, else ``$NIBBLE_THREADS``, else leave torch's default.

    Raises:
        NibbleError: ``$NIBBLE_THREADS`` is not a whole number >= 1.
    """
    if threads is None and os.environ.get(THREADS_ENV):
        text = os.environ[THREADS_ENV]
        threads = int(text) if text.strip().isdigit() else 0
        if threads < 1:
            raise NibbleError(f"{THREADS_ENV}={text}: expected a whole number of threads >= 1")
    if threads is not None:
        torch.set_num_threads(threads)


def _busy_note() -> str:
    """``; load L on N cores: fewer threads may be faster`` when the 1-minute load average exceeds the CPU's
    cores (threads then compete with other work), else nothing."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    return f"; load {load:.1f} on {cores} cores: fewer threads may be faster" if load > cores else ""


def describe(device: torch.device, dtype: torch.dtype | None = None, asked: str | None = None) -> str:
    """One line for the start of a run: the device (with its name and memory, and for a CPU its threads and, when
    the machine is busier than its cores, a note saying so), and the dtype.

    ``asked`` is the dtype setting, shown when it was ``auto``.
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    elif device.type == "xpu":
        props = torch.xpu.get_device_properties(device)
        what = f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    elif device.type == "cpu":
        _, total = device_memory(device)
        size = f", {total / 2**30:.1f} GiB" if total else ""
        threads = torch.get_num_threads()
        what = f"cpu ({threads} thread{'s' if threads != 1 else ''}{size}{_busy_note()})"
    else:
        what = str(device)
    if dtype is None:
        return f"device {what}"
    note = " (auto)" if asked == "auto" else ""
    return f"device {what}, dtype {dtype_name(dtype)}{note}"


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_UNITS["ti"] = 2**40


def parse_bytes(text: str, key: str = "size") -> int:
    """A memory size such as ``12GB``, ``800MB``, ``1.5GiB`` or ``1000000`` in bytes (KB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB of 1024; the trailing B is optional).

    Raises:
        NibbleError: text that is not a positive size, naming ``key``.
    """
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(text).lower())
    value = float(found.group(1)) * _UNITS[found.group(2) or ""] if found else 0
    if value < 1:
        raise NibbleError(f"'{key}' must be a positive memory size such as 12GB, 800MB or 1.5GiB, got {text!r}")
    return int(value)


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    return _meminfo("MemAvailable")


def device_memory(device: torch.device) -> tuple[int | None, int | None]:
    """``(free, total)`` bytes of ``device``; host memory (MemAvailable, MemTotal) for the CPU. None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "xpu":
        return torch.xpu.mem_get_info(device)
    if device.type == "mps":
        total = torch.mps.recommended_max_memory()
        return total - torch.mps.driver_allocated_memory(), total
    return memory_available_bytes(), _meminfo("MemTotal")


def _status(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def rss_bytes() -> int | None:
    """This process's resident set size now (Linux), else None."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (since :func:`reset_peak_rss`, where that worked).

    VmHWM on Linux (which, unlike ``ru_maxrss``, does not carry a parent's peak into a child started with
    fork + exec); ``resource.getrusage`` elsewhere (kilobytes on Linux, bytes on macOS).
    """
    peak = _status("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the peak RSS at the current RSS (Linux: ``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


# glibc's mallopt parameter number for the size from which malloc maps each block on its own.
_M_MMAP_THRESHOLD = -3


def return_large_blocks_to_os(threshold: int) -> bool:
    """Make the C allocator map every CPU block of ``threshold`` bytes or more on its own, so that freeing one
    returns its memory to the OS; True where that took effect (glibc), False elsewhere.

    By default glibc raises that threshold to the size of each large block freed, after which such blocks
    come from its heap, whose freed holes stay resident. The price is a page fault per 4 KiB each time a new
    block is first written: measured on SmolLM2 instruction tuning (4 x 512 tokens, 2-core CPU) with 4 MiB,
    peak RSS 3.1 GB instead of 4.4 GB, but 74 tokens/s instead of 93, so plain runs keep glibc's default.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no mallopt)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _allocator(device: torch.device):
    """The torch module with ``max_memory_allocated`` / ``reset_peak_memory_stats`` for ``device``, or None."""
    if device.type == "cuda":
        return torch.cuda
    if device.type == "xpu":
        return torch.xpu
    return None


@dataclass
class MemoryMeter:
    """Peak memory of a stretch of work on one device: create it (which resets the peaks), then :meth:`read`.

    ``peak_device`` is the device allocator's peak (``max_memory_allocated``; MPS keeps no peak, so its current
    driver allocation; None on the CPU, whose memory is the process's RSS). ``peak_rss`` is the process's peak
    RSS and ``rss_at_start`` its RSS when the meter was created; ``used`` is what the work took on the device:
    the allocator's peak, or on the CPU the peak RSS above the RSS at the start.
    """

    device: torch.device
    rss_at_start: int = 0

    def __post_init__(self) -> None:
        allocator = _allocator(self.device)
        if allocator is not None:
            allocator.reset_peak_memory_stats(self.device)
        reset_peak_rss()
        self.rss_at_start = rss_bytes() or 0

    def read(self) -> dict[str, int | None]:
        """``{"peak_device_bytes", "peak_rss_bytes", "rss_at_start_bytes", "used_bytes"}`` so far."""
        allocator = _allocator(self.device)
        if allocator is not None:
            peak_device = allocator.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            peak_device = torch.mps.driver_allocated_memory()
        else:
            peak_device = None
        peak_rss = peak_rss_bytes()
        used = peak_device if peak_device is not None else max(peak_rss - self.rss_at_start, 0)
        return {
            "peak_device_bytes": peak_device,
            "peak_rss_bytes": peak_rss,
            "rss_at_start_bytes": self.rss_at_start,
            "used_bytes": used,
        }


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``: through pinned host memory with ``non_blocking`` copies to CUDA/XPU (the host does
    not wait for them), plain copies to MPS, unchanged on the CPU."""
    if device.type == "cpu":
        return dict(batch)
    if device.type in ("cuda", "xpu"):
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) of the GPUs MFU is reported for, by a substring of
# torch.cuda.get_device_name, most specific first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak matmul FLOP/s in ``dtype`` where known (16-bit on the GPUs of :data:`PEAK_FLOPS`), else
    None (CPUs, fp32, other GPUs)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)
