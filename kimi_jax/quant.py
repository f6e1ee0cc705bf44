"""INT4 weights as data: `Int4Weight` mirrors compressed-tensors `pack-quantized` (docs/k2-format.md §3).

The packed words and scales stay exactly as the checkpoint stores them — [..., out, in/8] int32 and
[..., out, in/group] scales — so loading is a copy, not a conversion, and a device never holds the
experts dequantized. The bit layout and the quantizer live in kernels_pallas/int4.py beside the
kernels that read them; this module only wraps them as a pytree for the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Int4Weight:
    packed: jax.Array  # int32 [..., out, ceil(in / 8)]
    scale: jax.Array  # [..., out, in / group_size]
    in_features: int  # static: the logical input size (packing may pad it to a multiple of 8)

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[-1]

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.size * 4 + self.scale.size * jnp.dtype(self.scale.dtype).itemsize

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., out, in] — for tests and export only; the model never calls this on experts."""
        from kernels_pallas import int4 as int4_layout

        return int4_layout.dequantize_int4_ref(self.packed, self.scale, self.in_features, dtype)


jax.tree_util.register_dataclass(Int4Weight, data_fields=["packed", "scale"], meta_fields=["in_features"])


def quantize(w_out_in: np.ndarray, group_size: int, scale_dtype=jnp.bfloat16) -> Int4Weight:
    """Quantize dense weights [..., out, in] (the model's and the checkpoint's orientation)."""
    from kernels_pallas import int4 as int4_layout

    w = np.asarray(w_out_in, np.float32)
    packed, scale = int4_layout.quantize_int4(w, group_size, scale_dtype=scale_dtype)
    return Int4Weight(jnp.asarray(packed), jnp.asarray(scale), w.shape[-1])


def is_routed_expert(path, var) -> bool:
    """Whether a model parameter is routed-expert weights (the ones K2 ships as INT4): the
    parameters whose first declared axis is `experts` — not the shared expert, the dense layers'
    MLP or the router. Takes (path, variable) like the pairs of `nnx.to_flat_state`, so it is also
    an nnx filter."""
    return tuple(var.get_metadata().get("axes", ()))[:1] == ("experts",)
