"""Pallas kernels for Kimi K2's decode: INT4 (compressed-tensors pack-quantized, W4A16) routed-expert
matmuls and paged MLA attention. Arrays in, arrays out; nothing here imports kimi_jax.

File names say what each holds and for which backend: `int4_ct` (the checkpoint's INT4 format and
its quantizer), `int4_packing` (the INT4 packings kernels read, and repacking between them);
`experts_xla`, `experts_gpu`, `experts_tpu` (routed-expert matmuls: reference, Triton, Mosaic);
`paged_attention` (the reference), `paged_attention_gpu`, `paged_attention_tpu`, `cache_write`.
`backends` says, per platform, which kernels run and which formats they read; `ops` is the one
dispatch: every op takes `impl=`.
"""

from kernels_pallas import backends, ops
from kernels_pallas.int4_ct import dequantize_int4_ref, pack_int4, quantize_int4, unpack_int4

__all__ = ["backends", "ops", "quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4_ref"]
