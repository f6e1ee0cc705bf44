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
    """A packed INT4 weight: eight signed 4-bit values per int32 word and one scale per group of
    `group_size` inputs, a pytree of two arrays. In layout "ct" (compressed-tensors, as the
    checkpoint stores it) the words run along the input dimension; other layouts reorder the same
    bits for a device's kernels (`to_layout`)."""

    packed: jax.Array  # int32 [..., out, ceil(in / 8)] in layout "ct"
    scale: jax.Array  # [..., out, in / group_size] in layout "ct"
    in_features: int  # static: the logical input size (packing may pad it to a multiple of 8)
    layout: str = "ct"  # static: the device layout (kernels_pallas/layout.py); "ct" = the checkpoint's

    @property
    def group_size(self) -> int:
        """Inputs sharing one scale."""
        from kernels_pallas.layout import scale_groups

        return self.in_features // scale_groups(self.scale, self.layout)

    @property
    def out_features(self) -> int:
        """Output rows of each matrix."""
        from kernels_pallas.layout import features

        return features(self.packed, self.scale, self.layout)[0]

    @property
    def dtype(self) -> jnp.dtype:
        """The scales' dtype, which dequantized values round to."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: packed words plus scales."""
        return self.packed.size * 4 + self.scale.size * jnp.dtype(self.scale.dtype).itemsize

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """[..., out, in] — for tests and export only; the model never calls this on experts."""
        from kernels_pallas.layout import dequantize

        return dequantize(self.packed, self.scale, self.layout, dtype, self.in_features)

    def to_layout(self, layout: str) -> "Int4Weight":
        """The same weights in another device layout (a reordering: bit for bit the same values)."""
        from kernels_pallas.layout import from_layout, to_layout

        if layout == self.layout:
            return self
        packed, scale = (self.packed, self.scale) if self.layout == "ct" else \
            from_layout(self.packed, self.scale, self.layout)
        if layout != "ct":
            packed, scale = to_layout(packed, scale, layout)
        return Int4Weight(packed, scale, self.in_features, layout)


jax.tree_util.register_dataclass(Int4Weight, data_fields=["packed", "scale"], meta_fields=["in_features", "layout"])


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
