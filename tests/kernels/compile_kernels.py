"""Compile the kernels for one NVIDIA architecture without a GPU: ``compile_kernels.py ARCH [all]``.

Run by test_triton_compile.py in a subprocess without ``TRITON_INTERPRET`` (kernels must be real JIT functions).
Without ``all``: representative variants (formats, dtypes, both families, bias), each at its family's first
config. With ``all``: every autotune config of both families of both GEMM-shaped kernels, in bf16 (the GPU
compute dtype) on double-quantized NF4 with bias. Prints one ``compiled`` line per kernel with its shared memory
and ptxas spill bytes, and fails loudly on the first compiler error or, in bf16, a kernel needing more shared
memory than the architecture's largest GPU gives a block or spilling more than :data:`MAX_SPILL_BYTES`.
"""

import contextlib
import io
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nibble.kernels import triton_common, triton_dequant, triton_gemm, triton_grad_input

DTYPES = {"bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
FORMATS = {  # scale pointer type and format constexprs
    "nf4": ("*fp32", {"BS": 64, "NF4": True, "DOUBLE_QUANT": False}),
    "nf4-dq": ("*u8", {"BS": 64, "NF4": True, "DOUBLE_QUANT": True}),
    "int4": ("*fp16", {"BS": 128, "NF4": False, "DOUBLE_QUANT": False}),
}
OPTIONAL_POINTERS = ("code_ptr", "nested_absmax_ptr", "nested_code_ptr", "bias_ptr")
# Shared memory a block may opt into: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB. A config over it fails to
# launch there (the autotuner skips it after paying its compile).
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
# Register spills a bf16 config may have (ptxas "bytes spill stores"): a few hundred bytes of a 128x256 tile's
# accumulator in local memory, which the L1 cache absorbs. Both bounds hold for bf16, what GPU runs compute in;
# fp32 and fp64 tiles take twice and four times the shared memory (the first large-M fp64 config 193 KiB, over
# an A100's limit) and spill kilobytes, so they are only reported: their tl.dot runs on FMA units, the autotuner
# skips a config that does not fit, and the smaller tiles do.
MAX_SPILL_BYTES = 1024


PROBLEMS: list[str] = []  # bf16 kernels over a bound, reported together at the end


def build(fn, arch: int, fmt: str, pointers: dict, ints: list[str], constexprs: dict, config=None) -> None:
    """Compile ``fn`` for ``sm_{arch}`` and print its shared memory and ptxas spill-store bytes (bounded in bf16,
    see :data:`PROBLEMS`)."""
    scale_type, format_constexprs = FORMATS[fmt]
    signature = {name: "constexpr" for name in fn.arg_names}
    signature.update(pointers, packed_ptr="*u8", scale_ptr=scale_type, offset="fp32")
    signature.update({name: "i32" for name in ints})
    if format_constexprs["NF4"]:
        signature["code_ptr"] = "*fp32"
    if format_constexprs["DOUBLE_QUANT"]:
        signature.update(nested_absmax_ptr="*fp32", nested_code_ptr="*fp32")
    absent = {n: None for n in OPTIONAL_POINTERS if signature.get(n) == "constexpr"}
    constexprs = {**absent, **format_constexprs, **constexprs, **(config.kwargs if config else {})}
    options = {"enable_fp_fusion": False}  # as every launcher passes it
    if config:
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the ptxas log, printed by Triton under dump_ptxas_log
        source = ASTSource(fn, signature, constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue()))
    shared = kernel.metadata.shared
    tile = {k: v for k, v in constexprs.items() if k.startswith(("BLOCK", "SPLIT"))}
    launch = f"warps={options.get('num_warps')} stages={options.get('num_stages')}"
    print("compiled", fn.__name__, f"sm_{arch}", fmt, sorted(pointers.items()), constexprs.get("ATOMIC"), tile,
          f"{launch} shared={shared} spills={spills}")  # fmt: skip
    if constexprs["DTYPE"] is not tl.bfloat16:
        return
    if shared > SHARED_LIMITS[arch]:
        PROBLEMS.append(f"{fn.__name__} {tile} {launch} needs {shared} bytes of shared memory; sm_{arch} gives a "
                        f"block {SHARED_LIMITS[arch]}")  # fmt: skip
    if spills > MAX_SPILL_BYTES:
        PROBLEMS.append(f"{fn.__name__} {tile} {launch} spills {spills} bytes on sm_{arch}, over {MAX_SPILL_BYTES}")


def matmul_like(module, arch: int, fmt: str, dtype: str, small: bool, bias: bool, config=None) -> None:
    """A config (default: the first) of the small-M (split, atomic) or large-M family of a GEMM-shaped kernel."""
    autotuner = module._small_m if small else module._large_m
    fn = autotuner.fn
    x_name = fn.arg_names[0]
    out_name = next(n for n in fn.arg_names if n in ("y_ptr", "dx_ptr"))
    acc = "fp64" if dtype == "fp64" else "fp32"
    pointers = {x_name: f"*{dtype}", out_name: f"*{acc}" if small else f"*{dtype}"}
    if bias:
        pointers["bias_ptr"] = f"*{dtype}"
    ints = [n for n in fn.arg_names if n in ("M", "N", "K", "M_BUCKET") or n.startswith("stride")]
    constexprs = {
        "ALIGNED": True,
        "DTYPE": DTYPES[dtype],
        "ACC_DTYPE": DTYPES[acc],
        "PRECISION": "tf32" if dtype == "bf16" else "ieee",
        "ATOMIC": small,
        "INTERPRET": False,
    }
    build(fn, arch, fmt, pointers, ints, constexprs, config or autotuner.configs[0])


def main(arch: int, every_config: bool) -> None:
    if knobs := getattr(triton, "knobs", None):
        knobs.nvidia.dump_ptxas_log = True
    if every_config:
        for module, bias in ((triton_gemm, True), (triton_grad_input, False)):
            for small, configs in ((True, triton_common.SMALL_M_CONFIGS), (False, module.LARGE_M_CONFIGS)):
                for config in configs:
                    matmul_like(module, arch, "nf4-dq", "bf16", small=small, bias=bias, config=config)
        return
    dequant_constexprs = {"DTYPE": tl.bfloat16, "INTERPRET": False, "BLOCK": triton_dequant.BLOCK}
    build(triton_dequant._dequant_kernel, arch, "nf4-dq", {"out_ptr": "*bf16"}, ["numel", "nbytes"], dequant_constexprs)
    matmul_like(triton_gemm, arch, "nf4-dq", "bf16", small=False, bias=True)
    matmul_like(triton_gemm, arch, "int4", "fp32", small=True, bias=True)
    matmul_like(triton_grad_input, arch, "nf4", "bf16", small=False, bias=False)
    matmul_like(triton_grad_input, arch, "nf4-dq", "fp32", small=True, bias=False)
    matmul_like(triton_gemm, arch, "nf4", "fp64", small=False, bias=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:] == ["all"])
    if PROBLEMS:
        raise SystemExit("\n".join(PROBLEMS))
