"""Repacking INT4 routed experts, loaded in the checkpoint's packing ("ct"), into the packing the
devices' kernels read (kernels_pallas/int4_packing.py; "tpu" on TPU), on the devices, one parameter
at a time so that memory stays bounded by one layer's experts.

Every parameter goes through the one jitted `_repack`: its compiled programs are keyed by shape,
packing and sharding, which repeat from layer to layer, so a K2 load compiles it once per distinct
projection shape (gate and up share theirs), not once per parameter.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from flax import nnx

from kimi_jax.quant import Int4Weight
from kimi_jax.sharding import DEFAULT_RULES, param_axes, sharding_for


@functools.partial(jax.jit, static_argnames=("packing", "shardings"))
def _repack(weight: Int4Weight, *, packing: str, shardings) -> Int4Weight:
    """`weight` in `packing`, its words and scales placed per `shardings` (None: where they are)."""
    out = weight.to_packing(packing)
    if shardings is None:
        return out
    packed, scale = (jax.lax.with_sharding_constraint(a, s) for a, s in zip((out.packed, out.scale), shardings))
    return Int4Weight(packed, scale, out.in_features, out.packing)


def repack_compiles() -> int:
    """Programs `_repack` has compiled so far in this process (tests bound it)."""
    return _repack._cache_size()


def repack_experts(target_state, mesh=None, rules=DEFAULT_RULES) -> Callable:
    """transform(path, value) that moves an INT4 routed-expert parameter, loaded in the checkpoint's
    packing, into the packing and sharding `target_state` (an abstract state) gives it; other
    parameters, and experts already in their packing, pass through."""
    targets = dict(nnx.to_flat_state(target_state))

    def transform(path, value):
        want = targets[path].get_value()
        if not isinstance(value, Int4Weight) or want.packing == value.packing:
            return value
        shardings = None
        if mesh is not None:
            axes, name = param_axes(targets[path]), "/".join(map(str, path))
            shardings = tuple(sharding_for(axes, a.shape, mesh, rules, name=name) for a in (want.packed, want.scale))
        return _repack(value, packing=want.packing, shardings=shardings)

    return transform
