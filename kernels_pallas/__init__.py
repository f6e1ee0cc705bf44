"""Pallas kernels for INT4 (compressed-tensors pack-quantized, W4A16) weights: arrays in, arrays out.

Nothing here imports kimi_jax. Each kernel file holds the kernel(s), a wrapper taking `interpret`,
and a pure-jnp `*_ref`; `ops` is the one place that picks kernel or reference for the platform.
The name `kernels_pallas.int4_matmul` is the function; import from the module of that name with
`from kernels_pallas.int4_matmul import ...`.
"""

from kernels_pallas import ops
from kernels_pallas.dequant import dequantize_int4
from kernels_pallas.grouped_moe import (
    grouped_int4_matmul,
    grouped_int4_matmul_ref,
    grouped_int4_swiglu,
    grouped_int4_swiglu_ref,
)
from kernels_pallas.int4 import dequantize_int4_ref, pack_int4, quantize_int4, unpack_int4
from kernels_pallas.int4_matmul import int4_matmul, int4_matmul_ref

__all__ = [
    "ops",
    "quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4_ref", "dequantize_int4",
    "int4_matmul", "int4_matmul_ref",
    "grouped_int4_swiglu", "grouped_int4_swiglu_ref", "grouped_int4_matmul", "grouped_int4_matmul_ref",
]
