#!/usr/bin/env bash
# The checks a GPU session runs first (about 9 minutes at most; each part under its own timeout). Everything it
# prints also goes to $OUT (default ./gpu_check_out): versions.txt, kernel_tests.txt, bench_kernels.txt,
# bench_train_cuda.txt, profile.txt. Record the tables in benchmarks/README.md with the GPU's name and the date.
#
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh
#
# Without CUDA it runs its CPU-side parts (versions, the kernel tests through the Triton interpreter on a few
# files, bench_kernels' CPU path at one small shape) and says which parts it skipped.
set -u
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

part() {  # part NAME SECONDS COMMAND...: run one part under its own time limit, its output kept in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== $name: stopped at its ${limit}s limit"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && echo "== $name: exit status $rc"
    return 0
}

part versions 60 "$PYTHON" -c '
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
from nibble import kernels
print("triton kernels:", kernels.triton_unavailable() or "usable")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
else:
    print("device: no CUDA")'

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # compiled (not interpreted) kernels: tests/kernels/conftest.py puts the tensors on CUDA when there is one
    part kernel_tests 150 "$PYTHON" -m pytest tests/kernels -x -q -p no:randomly
    part bench_kernels 150 "$PYTHON" benchmarks/bench_kernels.py --models qwen3-0.6b,qwen3-4b --m 1,16,64,256,1024,4096
    part bench_train_cuda 180 "$PYTHON" benchmarks/bench_train_cuda.py --steps 10
    part profile 90 "$PYTHON" benchmarks/bench_train_cuda.py --steps 2 --layers 4 --profile "$OUT/trace.json"
else
    part kernel_tests 240 env TRITON_INTERPRET=1 "$PYTHON" -m pytest tests/kernels/test_triton_dispatch.py -x -q \
        -p no:randomly
    part bench_kernels 120 "$PYTHON" benchmarks/bench_kernels.py --models qwen3-0.6b --m 16
    echo "== skipped without CUDA: bench_train_cuda, profile"
fi
