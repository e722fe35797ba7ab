"""nibble.devices: device and dtype resolution, memory sizes and meters, batches moved to a device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nibble import devices
from nibble.devices import (
    ONEDNN_CACHE_ENV,
    auto_dtype,
    cpu_flags,
    cpu_has_native_bf16,
    describe,
    parse_bytes,
    resolve_device,
    resolve_dtype,
    to_device,
)
from nibble.errors import NibbleError

XEON_AVX2 = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


def test_cpu_bf16_is_read_from_the_cpuinfo_flags():
    assert cpu_flags(XEON_AVX2) == {"fpu", "sse", "avx", "avx2", "fma"}
    assert not cpu_has_native_bf16(XEON_AVX2)
    assert cpu_has_native_bf16(SAPPHIRE)
    assert cpu_has_native_bf16(GRAVITON3)
    assert not cpu_has_native_bf16("")


def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert auto_dtype(torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # explicit wins
    assert auto_dtype(torch.device("mps")) == torch.float32
    with pytest.raises(NibbleError, match="dtype 'half' is not supported; use auto, float32"):
        resolve_dtype("half", torch.device("cpu"))


@pytest.mark.parametrize("setting", ["1", "0", "yes"])
def test_the_cpu_bf16_detection_can_be_overridden_from_the_environment(setting):
    # What a CI job uses to run a native-bf16 CPU's code paths on a CPU without it, and the reverse.
    script = (
        "import torch; from nibble import devices, kernels; cpu = torch.device('cpu'); "
        "print(devices.resolve_dtype('auto', cpu), kernels.on_fp32_units(torch.bfloat16, cpu))"
    )
    env = {**os.environ, devices.CPU_BF16_ENV: setting}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if setting == "yes":
        assert result.returncode != 0
        assert "NibbleError: environment variable NIBBLE_CPU_BF16='yes': use 1 (native bf16), 0" in result.stderr
    else:
        native = setting == "1"
        assert result.stdout.split() == [f"torch.{'bfloat16' if native else 'float32'}", str(not native)]


def test_auto_dtype_on_cuda_is_bf16_where_native_else_fp16(monkeypatch):
    class FakeDevice:  # torch.cuda.device() needs a GPU; the choice only asks whether bf16 is native
        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert auto_dtype(torch.device("cuda", 0)) == expected


def test_auto_is_the_cpu_without_accelerators_and_missing_devices_are_one_line():
    if torch.cuda.is_available() or torch.backends.mps.is_available() or torch.xpu.is_available():
        pytest.skip("this check is for a machine without accelerators")  # never the case on CI
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name, fragment in (
        ("cuda", "device 'cuda': CUDA is not available"),
        ("cuda:1", "device 'cuda:1': CUDA is not available"),
        ("mps", "device 'mps': MPS (Apple GPU) is not available"),
        ("xpu", "device 'xpu': no Intel XPU is available"),
        ("gpu", "device 'gpu' is not valid; use auto, cpu, cuda, cuda:N, mps or xpu"),
        ("meta", "device 'meta' is not valid"),
    ):
        with pytest.raises(NibbleError, match=re.escape(fragment)) as info:
            resolve_device(name)
        assert "\n" not in str(info.value)


def test_memory_sizes_parse_with_decimal_and_binary_units():
    assert parse_bytes("12GB") == 12 * 10**9
    assert parse_bytes("800 mb") == 800 * 10**6
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("2g") == 2 * 10**9
    assert parse_bytes("4096") == 4096
    for bad in ("", "12 parsecs", "-1GB", "0", "GB"):
        with pytest.raises(NibbleError, match="'memory_budget' must be a positive memory size"):
            parse_bytes(bad, "memory_budget")


def test_memory_meter_sees_an_allocation_on_the_cpu():
    # In a fresh process: one that has freed memory may serve the allocation from pages already resident.
    script = """
import json, torch
from nibble.devices import MemoryMeter
meter = MemoryMeter(torch.device("cpu"))
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
seen = meter.read()
del block
print(json.dumps([seen, MemoryMeter(torch.device("cpu")).read()["used_bytes"]]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seen, fresh_used = json.loads(result.stdout)
    assert seen["peak_device_bytes"] is None  # the CPU's memory is the process's RSS
    assert seen["used_bytes"] >= 60 * 2**20
    assert seen["peak_rss_bytes"] >= seen["rss_at_start_bytes"] + seen["used_bytes"] - 2**20
    assert fresh_used < 32 * 2**20  # a new meter starts afresh


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_blocks_leave_the_resident_set():
    # Blocks freed while a later one lives: glibc keeps them resident (251 MiB here) unless each has its own map.
    script = """
from nibble.devices import return_large_blocks_to_os, rss_bytes
import torch
assert return_large_blocks_to_os(4 << 20)
before = rss_bytes()
for _ in range(2):
    blocks = [torch.ones(5 << 18) for _ in range(50)]  # 50 blocks of 5 MiB
    keep = blocks[-1]
    del blocks
print(rss_bytes() - before)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(result.stdout) < 32 * 2**20


def test_batches_stay_as_they_are_on_the_cpu():
    batch = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    moved = to_device(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys() and all(moved[k] is batch[k] for k in batch)


def test_nibble_threads_env_sets_torch_threads(monkeypatch):
    from nibble.devices import apply_threads

    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("NIBBLE_THREADS", "1")
        apply_threads()
        assert torch.get_num_threads() == 1
        apply_threads(2)
        assert torch.get_num_threads() == 2  # the flag wins over the environment
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv("NIBBLE_THREADS", bad)
            with pytest.raises(NibbleError, match=f"NIBBLE_THREADS={bad}: expected a whole number"):
                apply_threads()
    finally:
        torch.set_num_threads(threads)


def test_the_device_line_says_when_the_machine_is_busier_than_its_cores(monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.5, 0.0, 0.0))
    busy = describe(torch.device("cpu"), torch.float32)
    assert f"; load {cores + 1.5:.1f} on {cores} cores: fewer threads may be faster)" in busy
    assert busy.startswith("device cpu (") and busy.endswith(", dtype float32") and "\n" not in busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert "load" not in describe(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(("given", "seen"), [(None, "128"), ("7", "7")])
def test_onednns_kernel_cache_is_capped_unless_the_environment_says_otherwise(given, seen):
    """Set when nibble is imported, before oneDNN makes its first primitive (it reads the setting then)."""
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_ENV}
    if given is not None:
        env[ONEDNN_CACHE_ENV] = given
    code = f"import os, nibble.devices; print(os.environ[{ONEDNN_CACHE_ENV!r}])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == seen, out.stderr[-2000:]
