"""The kernels compile for NVIDIA GPUs (sm_80, sm_90) down to cubin, checked without a GPU.

The interpreter runs code the GPU compiler rejects (it once accepted a helper returning tensors of two
shapes from two constexpr branches), so representative variants go through the real compiler and the
``ptxas`` bundled with Triton (compile_kernels.py, in a subprocess without ``TRITON_INTERPRET``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SCRIPT = Path(__file__).with_name("compile_kernels.py")


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas to compile NVIDIA kernels with")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia_gpus(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(arch)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 6
