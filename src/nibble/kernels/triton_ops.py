"""The Triton implementations the dispatcher in ``nibble.kernels`` picks up.

Importing this module fails with ImportError when Triton is missing, which the dispatcher reads as
"Triton unavailable". Same signatures, dtypes and results as ``nibble.kernels.reference``.
"""

from __future__ import annotations

import triton  # noqa: F401  (an ImportError here is how the dispatcher learns Triton is missing)

from nibble.kernels.triton_dequant import dequantize
from nibble.kernels.triton_gemm import matmul
from nibble.kernels.triton_grad_input import matmul_grad_input

__all__ = ["dequantize", "matmul", "matmul_grad_input"]
