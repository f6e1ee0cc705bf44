"""Pallas kernels for Kimi K2's decode: INT4 (compressed-tensors pack-quantized, W4A16) expert matmuls
and paged MLA attention. Arrays in, arrays out; nothing here imports kimi_jax.

Each kernel file holds kernels for one op family and backend (`int4_gpu`, `paged_attention_gpu`, the
Mosaic TPU code in `int4_matmul` and `dequant`), each beside a pure-jnp reference with the same
signature. `ops` is the one dispatch: every op takes `impl=` (see `ops.impl_for_platform`).
"""

from kernels_pallas import ops
from kernels_pallas.int4 import dequantize_int4_ref, pack_int4, quantize_int4, unpack_int4

__all__ = ["ops", "quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4_ref"]
