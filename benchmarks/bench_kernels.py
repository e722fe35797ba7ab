"""4-bit matmul kernels vs dense and dequantize-then-matmul, forward and grad-input, on Qwen3 projection shapes.

On CUDA (bf16): nibble's fused Triton kernels against (a) dense bf16 ``F.linear`` (cuBLAS), (b) dequantize the
whole NF4 weight then matmul (the default 4-bit stack; nibble's torch reference path) and (c) bitsandbytes'
``matmul_4bit`` when it is installed. Targets: fused >= 0.9x dense at M >= 512 and >= 3x faster at M = 1.
"nibble dispatch" is what a model runs: the fused kernels below ``triton_ops.DENSE_FROM_ROWS`` rows, dequantize +
cuBLAS from there; where "nibble fused" and "dequant+mm" cross over over M is where that constant belongs.

Without CUDA it runs the CPU path instead (fp32, small shapes): dense ``F.linear`` vs what nibble runs on CPU
(the torch reference: dequantize then matmul) vs bitsandbytes' CPU path. Triton only runs on CPU through its
interpreter, far too slow to time, so no fused-kernel figures come from a CPU run.

Every ratio is ``dense time / provider time`` measured in the same run (> 1 means faster than dense).

    python benchmarks/bench_kernels.py [--models qwen3-0.6b,qwen3-4b] [--m 1,16,256,2048,8192]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nibble.kernels import reference
from nibble.quant import nf4

# Projection geometry of the released Qwen3 configs (hidden, intermediate, heads, kv heads, head dim).
QWEN3 = {
    "qwen3-0.6b": (1024, 3072, 16, 8, 128),
    "qwen3-4b": (2560, 9728, 32, 8, 128),
}


def projections(model: str) -> list[tuple[str, int, int]]:
    """(name, N = out_features, K = in_features) of the distinct block projections (v = k, up = gate)."""
    hidden, inter, heads, kv_heads, head_dim = QWEN3[model]
    return [
        ("q_proj", heads * head_dim, hidden),
        ("k_proj", kv_heads * head_dim, hidden),
        ("o_proj", hidden, heads * head_dim),
        ("gate_proj", inter, hidden),
        ("down_proj", hidden, inter),
    ]


def seconds(fn: Callable[[], object], cuda: bool) -> float:
    """Seconds per call: the median on CUDA; on CPU the minimum, which other processes on the machine inflate least."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < 0.3 and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bnb_weight(weight: torch.Tensor):
    """bitsandbytes' NF4 weight and quant state, or None when it is not installed."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return packed, state, packed.numel() + state.absmax.numel() * state.absmax.element_size()


def providers(
    op: str, x: torch.Tensor, weight: torch.Tensor, qweight: nf4.NF4Weight, bnb, cuda: bool
) -> dict[str, tuple[Callable[[], torch.Tensor], int]]:
    """name -> (call, weight bytes read) for ``op`` ("fwd": x @ W^T, "grad": dY @ W)."""
    dense_bytes = weight.numel() * weight.element_size()
    q_bytes = qweight.memory_bytes()
    if op == "fwd":
        calls = {
            "dense": (lambda: F.linear(x, weight), dense_bytes),
            "dequant+mm": (lambda: reference.matmul(x, qweight), q_bytes),
        }
        if cuda:
            from nibble.kernels import triton_gemm, triton_ops

            calls["nibble fused"] = (lambda: triton_gemm.matmul(x, qweight), q_bytes)
            calls["nibble dispatch"] = (lambda: triton_ops.matmul(x, qweight), q_bytes)  # what runs (crossover)
        if bnb is not None:
            import bitsandbytes

            packed, state, nbytes = bnb
            calls["bitsandbytes"] = (lambda: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state), nbytes)
        return calls
    calls = {
        "dense": (lambda: x @ weight, dense_bytes),
        "dequant+mm": (lambda: reference.matmul_grad_input(x, qweight), q_bytes),
    }
    if cuda:
        from nibble.kernels import triton_grad_input, triton_ops

        calls["nibble fused"] = (lambda: triton_grad_input.matmul_grad_input(x, qweight), q_bytes)
        calls["nibble dispatch"] = (lambda: triton_ops.matmul_grad_input(x, qweight), q_bytes)
    if bnb is not None:
        import bitsandbytes.functional as bnbf

        packed, state, nbytes = bnb
        # what bitsandbytes' MatMul4Bit.backward computes for the input gradient
        calls["bitsandbytes"] = (lambda: x @ bnbf.dequantize_4bit(packed, state).to(x.dtype), nbytes)
    return calls


def run(models: list[str], m_values: list[int], cuda: bool) -> list[dict]:
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    rows: list[dict] = []
    header = f"{'op':<5}{'model':<12}{'proj':<10}{'N':>6}{'K':>6}{'M':>6}  {'provider':<14}"
    header += f"{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'x dense':>9}{'rel err':>9}"
    print(header)
    print("-" * len(header))
    for model in models:
        for proj, n, k in projections(model):
            weight = (torch.randn(n, k, device=device) * 0.02).to(dtype)
            qweight = nf4.quantize(weight, blocksize=64)
            bnb = bnb_weight(weight)
            for op in ("fwd", "grad"):
                for m in m_values:
                    inner = k if op == "fwd" else n
                    x = torch.randn(m, inner, device=device, dtype=dtype)
                    calls = providers(op, x, weight, qweight, bnb, cuda)
                    expected = calls["dequant+mm"][0]()
                    dense_s = None
                    for name, (fn, weight_bytes) in calls.items():
                        s = seconds(fn, cuda)
                        dense_s = dense_s or s
                        out = fn()
                        act_bytes = (x.numel() + out.numel()) * x.element_size()
                        err = (out.float() - expected.float()).abs().max() / expected.float().abs().max()
                        row = {
                            "op": op,
                            "model": model,
                            "proj": proj,
                            "m": m,
                            "provider": name,
                            "ratio": dense_s / s,
                        }
                        rows.append(row)
                        print(
                            f"{op:<5}{model:<12}{proj:<10}{n:>6}{k:>6}{m:>6}  {name:<14}{s * 1e3:>9.3f}"
                            f"{2 * m * n * k / s / 1e12:>9.2f}{(weight_bytes + act_bytes) / s / 1e9:>8.1f}"
                            f"{dense_s / s:>9.2f}{'' if name == 'dense' else f'{err.item():.1e}':>9}"
                        )
                    print()
    return rows


def summarize(rows: list[dict]) -> None:
    """Geometric-mean ratio to dense per provider, op and M (the targets are stated for the fused kernels)."""
    print("geometric mean of (dense time / provider time) over projections:")
    keys = sorted({(r["provider"], r["op"], r["m"]) for r in rows if r["provider"] != "dense"})
    for provider, op, m in keys:
        ratios = [r["ratio"] for r in rows if (r["provider"], r["op"], r["m"]) == (provider, op, m)]
        gmean = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        print(f"  {provider:<14}{op:<5} M={m:<6}{gmean:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated: " + ", ".join(QWEN3))
    parser.add_argument("--m", help="comma-separated batch sizes M (tokens)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if cuda:
        print(f"device: {torch.cuda.get_device_name()} (bf16); fused Triton kernels vs dense cuBLAS")
        models, m_values = list(QWEN3), [1, 16, 256, 2048, 8192]
    else:
        print(
            f"device: CPU, {torch.get_num_threads()} threads, no CUDA: CPU path only (fp32, small shapes); "
            "nibble here is the torch reference (dequantize then matmul), no fused-kernel figures"
        )
        models, m_values = ["qwen3-0.6b"], [1, 16, 256]
    if args.models:
        models = args.models.split(",")
    if args.m:
        m_values = [int(v) for v in args.m.split(",")]
    summarize(run(models, m_values, cuda))


if __name__ == "__main__":
    main()
