#!/usr/bin/env bash
# The checks a GPU session runs first (9 minutes at most: each part under its own timeout, the limits summing to
# 525 s). Everything it prints also goes to $OUT (default ./gpu_check_out): versions.txt, kernel_tests.txt (the
# kernel tests compiled, not interpreted), sync_detector.txt (device reads per training step on CUDA, the bf16
# head gradient), bench_kernels.txt (Qwen3-0.6B/4B shapes over M 1-4096: where the fused kernel and
# dequantize + cuBLAS cross sets triton_ops.DENSE_FROM_ROWS), bench_train_cuda.txt, profile.txt (+ trace.json).
# Record the tables in benchmarks/README.md with the GPU's name and the date.
#
#   PYTHON=.venv/bin/python OUT=gpu_check_out benchmarks/gpu_check.sh
#
# Without CUDA it runs its CPU-side parts (versions, the dispatch tests through the Triton interpreter, the sync
# detector on CPU, bench_kernels' CPU path at one small shape) and prints one line naming the parts it skipped.
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

part versions 30 "$PYTHON" -c '
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

SYNC_TESTS="tests/train/test_step_syncs.py tests/train/test_sync_counter.py tests/nn/test_cross_entropy.py"
if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # compiled (not interpreted) kernels: tests/kernels/conftest.py puts the tensors on CUDA when there is one
    part kernel_tests 120 "$PYTHON" -m pytest tests/kernels -x -q -p no:randomly
    # nibble.train picks CUDA (--device auto): the step's reads there, device-to-host copies included; the torch
    # kernels, so that autotuning the tiny test model's shapes does not eat the part's time (no kernel reads back)
    part sync_detector 75 env NIBBLE_KERNELS=torch "$PYTHON" -m pytest $SYNC_TESTS -q -p no:randomly
    part bench_kernels 120 "$PYTHON" benchmarks/bench_kernels.py --models qwen3-0.6b,qwen3-4b \
        --m 1,16,64,256,512,1024,2048,4096
    part bench_train_cuda 120 "$PYTHON" benchmarks/bench_train_cuda.py --steps 10
    part profile 60 "$PYTHON" benchmarks/bench_train_cuda.py --steps 2 --layers 4 --profile "$OUT/trace.json"
else
    part kernel_tests 150 env TRITON_INTERPRET=1 "$PYTHON" -m pytest tests/kernels/test_triton_dispatch.py -x -q \
        -p no:randomly
    part sync_detector 120 "$PYTHON" -m pytest $SYNC_TESTS -q -p no:randomly
    part bench_kernels 60 "$PYTHON" benchmarks/bench_kernels.py --models qwen3-0.6b --m 16
    echo "== no CUDA: skipped the compiled kernel tests, bench_kernels on CUDA, bench_train_cuda and the profile"
fi
