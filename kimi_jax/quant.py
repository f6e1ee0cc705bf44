"""INT4 weights as data: `Int4Weight` mirrors compressed-tensors `pack-quantized` (docs/k2-format.md §3).

The packed words and scales stay as the checkpoint stores them — [..., out, in/8] int32 and
[..., out, in/group] scales, packing "ct" — or, on a backend whose kernels read another packing,
the same bits in that order (kernels_pallas/int4_packing.py): loading is a copy or a repacking,
never a conversion, and a device never holds the experts dequantized. The bit format and the
quantizer live in kernels_pallas/int4_ct.py beside the kernels that read them; this module wraps
them as a pytree for the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Int4Weight:
    """A packed INT4 weight: eight signed 4-bit values per int32 word and one scale per group of
    `group_size` inputs, a pytree of two arrays. In packing "ct" (compressed-tensors, as the
    checkpoint stores it) the words run along the input dimension; other packings reorder the same
    bits for a device's kernels (`to_packing`)."""

    packed: jax.Array  # int32 [..., out, ceil(in / 8)] in packing "ct"
    scale: jax.Array  # [..., out, in / group_size] in packing "ct"
    in_features: int  # static: the logical input size (packing may pad it to a multiple of 8)
    packing: str = "ct"  # static: the order of words and scales (kernels_pallas/int4_packing.py)

    @property
    def group_size(self) -> int:
        """Inputs sharing one scale."""
        from kernels_pallas.int4_packing import scale_groups

        return self.in_features // scale_groups(self.scale, self.packing)

    @property
    def out_features(self) -> int:
        """Output rows of each matrix."""
        from kernels_pallas.int4_packing import features

        return features(self.packed, self.scale, self.packing)[0]

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
        from kernels_pallas.int4_packing import dequantize

        return dequantize(self.packed, self.scale, self.packing, dtype, self.in_features)

    def to_packing(self, packing: str) -> "Int4Weight":
        """The same weights in another packing (a reordering: bit for bit the same values)."""
        from kernels_pallas.int4_packing import from_packing, to_packing

        if packing == self.packing:
            return self
        packed, scale = (self.packed, self.scale) if self.packing == "ct" else \
            from_packing(self.packed, self.scale, self.packing)
        if packing != "ct":
            packed, scale = to_packing(packed, scale, packing)
        return Int4Weight(packed, scale, self.in_features, packing)


jax.tree_util.register_dataclass(Int4Weight, data_fields=["packed", "scale"], meta_fields=["in_features", "packing"])


def quantize(w_out_in: np.ndarray, group_size: int, scale_dtype=jnp.bfloat16) -> Int4Weight:
    """Quantize dense weights [..., out, in] (the model's and the checkpoint's orientation)."""
    from kernels_pallas.int4_ct import quantize_int4

    w = np.asarray(w_out_in, np.float32)
    packed, scale = quantize_int4(w, group_size, scale_dtype=scale_dtype)
    return Int4Weight(jnp.asarray(packed), jnp.asarray(scale), w.shape[-1])


def random_int4(key, shape_out_in, group_size: int, scale_dtype=jnp.bfloat16, std: float = 0.02,
                packing: str = "ct") -> Int4Weight:
    """Random packed INT4 weights of logical shape [..., out, in] whose dequantized values have
    standard deviation about `std` (random models, tests, kernel benchmarks), stored in `packing`.

    Drawn directly in the packed domain (random nibbles, random positive scales): any nibble pattern
    is valid, and it also works under `nnx.eval_shape`, where no host quantizer can run."""
    *lead, n_out, n_in = shape_out_in
    k_words, k_scales = jax.random.split(key)
    packed = jax.random.bits(k_words, (*lead, n_out, n_in // 8), jnp.uint32).view(jnp.int32)
    # Nibbles are uniform on [-8, 7] (std ~4.6): scales around std / 4.6 give weights of std ~`std`.
    u = jax.random.uniform(k_scales, (*lead, n_out, n_in // group_size), jnp.float32, 0.5, 1.5)
    scale = (u * std / 4.6).astype(scale_dtype)
    return Int4Weight(packed, scale, n_in).to_packing(packing)


def packing_axes(axes_out_in: tuple, packing: str) -> tuple:
    """Logical axes of an INT4 weight's arrays in `packing`, from those of its [..., out, in]
    dimensions: "tpu" puts `in` before `out` (kernels_pallas/int4_packing.py)."""
    return axes_out_in if packing == "ct" else (*axes_out_in[:-2], axes_out_in[-1], axes_out_in[-2])


def is_routed_expert(path, var) -> bool:
    """Whether a model parameter is routed-expert weights (the ones K2 ships as INT4): the
    parameters whose first declared axis is `experts` — not the shared expert, the dense layers'
    MLP or the router. Takes (path, variable) like the pairs of `nnx.to_flat_state`, so it is also
    an nnx filter."""
    return tuple(var.get_metadata().get("axes", ()))[:1] == ("experts",)
