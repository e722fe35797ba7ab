"""Compile representative kernel variants for one NVIDIA architecture without a GPU: ``compile_kernels.py ARCH``.

Run by test_triton_compile.py in a subprocess without ``TRITON_INTERPRET`` (kernels must be real JIT functions).
Prints one ``compiled`` line per variant and fails loudly on the first compiler error.
"""

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nibble.kernels import triton_dequant, triton_gemm, triton_grad_input

DTYPES = {"bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
FORMATS = {  # scale pointer type and format constexprs
    "nf4": ("*fp32", {"BS": 64, "NF4": True, "DOUBLE_QUANT": False}),
    "nf4-dq": ("*u8", {"BS": 64, "NF4": True, "DOUBLE_QUANT": True}),
    "int4": ("*fp16", {"BS": 128, "NF4": False, "DOUBLE_QUANT": False}),
}
OPTIONAL_POINTERS = ("code_ptr", "nested_absmax_ptr", "nested_code_ptr", "bias_ptr")


def build(fn, arch: int, fmt: str, pointers: dict, ints: list[str], constexprs: dict, config=None) -> None:
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
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options)
    print("compiled", fn.__name__, f"sm_{arch}", fmt, sorted(pointers.items()), constexprs.get("ATOMIC"))


def matmul_like(module, arch: int, fmt: str, dtype: str, small: bool, bias: bool) -> None:
    """First autotune config of the small-M (split, atomic) or large-M family of a GEMM-shaped kernel."""
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
    build(fn, arch, fmt, pointers, ints, constexprs, autotuner.configs[0])


def main(arch: int) -> None:
    dequant_constexprs = {"DTYPE": tl.bfloat16, "INTERPRET": False, "BLOCK": triton_dequant.BLOCK}
    build(triton_dequant._dequant_kernel, arch, "nf4-dq", {"out_ptr": "*bf16"}, ["numel", "nbytes"], dequant_constexprs)
    matmul_like(triton_gemm, arch, "nf4-dq", "bf16", small=False, bias=True)
    matmul_like(triton_gemm, arch, "int4", "fp32", small=True, bias=True)
    matmul_like(triton_grad_input, arch, "nf4", "bf16", small=False, bias=False)
    matmul_like(triton_grad_input, arch, "nf4-dq", "fp32", small=True, bias=False)
    matmul_like(triton_gemm, arch, "nf4", "fp64", small=False, bias=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
