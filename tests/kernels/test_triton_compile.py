"""The kernels compile for NVIDIA GPUs (sm_80, sm_90) down to cubin, checked without a GPU.

The interpreter runs code the GPU compiler rejects (it once accepted a helper returning tensors of two
shapes from two constexpr branches), so the kernels go through the real compiler and the ``ptxas`` bundled
with Triton (compile_kernels.py, in a subprocess without ``TRITON_INTERPRET``), which also checks each one's
shared memory against the architecture's limit and its register spills against a bound. The suite compiles
representative variants; every autotune config (48 per architecture, about 5-20 s each on a 2-core CPU) is
compiled with ``NIBBLE_COMPILE_ALL=1`` (``make compile-check``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SCRIPT = Path(__file__).with_name("compile_kernels.py")
no_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas to compile NVIDIA kernels")


def _compile(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@no_ptxas
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia_gpus(tmp_path, arch):
    out = _compile(tmp_path, str(arch))
    assert out.count("compiled") == 6
    assert "spills=" in out and "shared=" in out


@no_ptxas
@pytest.mark.skipif(os.environ.get("NIBBLE_COMPILE_ALL") != "1", reason="every config: NIBBLE_COMPILE_ALL=1")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_autotune_config_compiles_within_shared_memory_and_spill_bounds(tmp_path, arch):
    from nibble.kernels import triton_common, triton_gemm, triton_grad_input

    out = _compile(tmp_path, str(arch), "all")
    large = len(triton_gemm.LARGE_M_CONFIGS) + len(triton_grad_input.LARGE_M_CONFIGS)
    assert out.count("compiled") == 2 * len(triton_common.SMALL_M_CONFIGS) + large
