"""The one dispatch point for the kernels: a table from each op's implementation names to kernels.

    backend = backends.backend_for(mesh.devices.flat[0].platform)   # once, by whoever builds the step
    h = ops.grouped_int4_swiglu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes,
                                impl=backend.impl, packing=backend.expert_packing)

Every op takes `impl=` explicitly; nothing is read from the platform, the mesh or a context at
call time, so an AOT compile for a TPU topology on a CPU host, a test that forces the interpreted
GPU kernels, and a benchmark that compares implementations all say what they run.

Implementations (`IMPLS`):
  "xla"            the pure-jnp reference: the CPU production path and every kernel's oracle
  "pallas_gpu"     Pallas Triton kernels (NVIDIA)
  "pallas_tpu"     Pallas Mosaic kernels
  "interpret_gpu"  the GPU kernels under Pallas' interpreter, on any platform
  "interpret_tpu"  the TPU kernels under TPU interpret mode (simulated VMEM/DMA, NaN-poisoned memory)

Ops (shapes as in each reference's docstring):
  grouped_int4_swiglu(x [M, K], gate_packed, gate_scale, up_packed, up_scale [E, I, ...], group_sizes [E],
                      *, packing) -> [M, I]
  grouped_int4_matmul(h [M, I], packed [E, D, I/8], scale [E, D, I/g], group_sizes [E], *, packing) -> [M, D]
  grouped_matmul(x [M, K], w [E, N, K], group_sizes [E]) -> [M, N]     dense experts (`ragged_dot`)
  paged_attention(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale, page_order)
      -> o_lat [R, C, H, r]
  write_pages(kv_pages, page [N], slot [N], rows [N, r + p], *, page_order) -> kv_pages (tokens into the cache)

`packing` (INT4 ops, default "ct"): how the expert words and scales are stored (int4_packing.py);
the shapes above are "ct"'s, "tpu" holds [.., K/8, N] and [.., K/g, N]. The GPU kernels read "ct",
the TPU kernels "tpu". `page_order` (default "rows"): the cache pages, [P, S, r + p] or "lanes"
[P, r + p, S] (paged_attention.py); the GPU kernel reads "rows", the TPU kernel both ("lanes" with S
a multiple of 128 without copies). backends.py pairs each platform's kernels with what they read.

When an op has no kernel for `impl`, or its kernel's support predicate rejects the arguments (a
group size that is not a power of two, a packing the kernel does not read, a head width Triton
cannot tile), the reference runs instead and the first such fallback per (op, impl, reason) is
logged. Kernels take unsharded arrays: under a mesh, call them inside
`jax.shard_map(..., check_vma=False)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax.numpy as jnp

from kernels_pallas import (
    cache_write,
    experts_gpu,
    experts_tpu,
    experts_xla,
    paged_attention_gpu,
    paged_attention_tpu,
)

# A module alias: the op below takes the module's name.
from kernels_pallas import paged_attention as paged_attention_module
from kernels_pallas.int4_packing import features, scale_groups

__all__ = ["IMPLS", "Op", "Kernel", "grouped_int4_swiglu", "grouped_int4_matmul", "grouped_matmul",
           "paged_attention", "write_pages"]

IMPLS = ("xla", "pallas_gpu", "pallas_tpu", "interpret_gpu", "interpret_tpu")
_log = logging.getLogger(__name__)
_logged: set = set()


def _always(*args, **kwargs) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One implementation of an op: `fn` has the reference's signature; `unsupported` returns why
    it cannot take these arguments, or None."""
    fn: Callable
    unsupported: Callable[..., str | None] = _always


class Op:
    """An op's reference and its kernels by implementation name; call it with `impl=`."""

    def __init__(self, name: str, reference: Callable, kernels: dict[str, Kernel]):
        unknown = set(kernels) - set(IMPLS)
        if unknown:
            raise ValueError(f"op {name}: unknown implementations {sorted(unknown)}")
        self.name, self.reference, self.kernels = name, reference, kernels
        self.__doc__ = reference.__doc__

    def fallback_reason(self, impl: str, *args, **kwargs) -> str | None:
        """Why `impl` cannot run these arguments (so the XLA reference will), or None if it can."""
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r} for {self.name}; expected one of {IMPLS}")
        if impl == "xla":
            return None
        kernel = self.kernels.get(impl)
        return "no kernel" if kernel is None else kernel.unsupported(*args, **kwargs)

    def choose(self, impl: str, *args, **kwargs) -> tuple[str, Callable]:
        """(implementation that will run, its function) for these arguments under `impl`; logs
        each distinct fallback once."""
        reason = self.fallback_reason(impl, *args, **kwargs)
        if reason is None:
            return impl, (self.reference if impl == "xla" else self.kernels[impl].fn)
        if (self.name, impl, reason) not in _logged:
            _logged.add((self.name, impl, reason))
            _log.warning("%s: %s falls back to the XLA reference (%s)", self.name, impl, reason)
        return "xla", self.reference

    def __call__(self, *args, impl: str, **kwargs):
        return self.choose(impl, *args, **kwargs)[1](*args, **kwargs)

    def __repr__(self):
        return f"<op {self.name}: {', '.join(['xla', *self.kernels])}>"


def _tpu_interpret():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def _pallas(gpu=None, tpu=None, gpu_unsupported=_always, tpu_unsupported=_always) -> dict[str, Kernel]:
    """The compiled and interpreted variants of a GPU and a TPU kernel taking `interpret=`."""
    table = {}
    if gpu is not None:
        table["pallas_gpu"] = Kernel(functools.partial(gpu, interpret=False), gpu_unsupported)
        table["interpret_gpu"] = Kernel(functools.partial(gpu, interpret=True), gpu_unsupported)
    if tpu is not None:
        table["pallas_tpu"] = Kernel(functools.partial(tpu, interpret=False), tpu_unsupported)
        table["interpret_tpu"] = Kernel(lambda *a, **kw: tpu(*a, interpret=_tpu_interpret(), **kw),
                                        tpu_unsupported)
    return table


def _without(keyword: str, kernel: Callable) -> Callable:
    """A kernel that reads one format, called without the `keyword` naming it: its support
    predicate has already sent every other format to the reference."""
    def call(*args, **kwargs):
        kwargs.pop(keyword, None)
        return kernel(*args, **kwargs)
    return call


def _int4_support(reads: str, unsupported: Callable[[int, int, int], str | None], weights: Callable):
    """Support predicate of INT4 kernels that read packing `reads`: `weights(*args)` -> (K, packed,
    scale); `unsupported(n, k, n_groups)` says why the kernels cannot take those shapes."""
    def check(*args, packing="ct", **kwargs):
        if packing != reads:
            return f"the kernels read packing {reads!r}, not {packing!r}"
        k, packed, scale = weights(*args)
        return unsupported(features(packed, scale, packing)[0], k, scale_groups(scale, packing))
    return check


def _int4_op(name, reference, gpu, tpu, weights) -> Op:
    gpu_unsupported = _int4_support("ct", lambda n, k, g: experts_gpu.unsupported_reason(k, k // g if g else 0),
                                    weights)
    tpu_unsupported = _int4_support("tpu", experts_tpu.unsupported_reason, weights)
    return Op(name, reference, _pallas(_without("packing", gpu), _without("packing", tpu), gpu_unsupported,
                                       tpu_unsupported))


grouped_int4_swiglu = _int4_op(
    "grouped_int4_swiglu", experts_xla.grouped_int4_swiglu_ref, experts_gpu.grouped_int4_swiglu_gpu,
    experts_tpu.grouped_int4_swiglu_tpu, lambda x, gp, gs, up, us, sizes: (x.shape[-1], gp, gs))

grouped_int4_matmul = _int4_op(
    "grouped_int4_matmul", experts_xla.grouped_int4_matmul_ref, experts_gpu.grouped_int4_matmul_gpu,
    experts_tpu.grouped_int4_matmul_tpu, lambda h, packed, scale, sizes: (h.shape[-1], packed, scale))

# Dense experts: GPU and TPU have a native grouped matmul; XLA:CPU would multiply every row by
# every expert, so the reference gathers experts per row block instead.
_ragged_dot = Kernel(experts_xla.grouped_matmul_ragged)
grouped_matmul = Op("grouped_matmul", experts_xla.grouped_matmul_ref,
                    {impl: _ragged_dot for impl in IMPLS if impl != "xla"})


def _values_pool(pool_arg: int, unsupported: Callable[..., str | None]) -> Callable[..., str | None]:
    """`unsupported`, after refusing a pool of bf16 words (paged_attention.pool_values): only the
    XLA reference reads those (on CPU, where XLA converts whole bf16 arrays it gathers from)."""
    def check(*args, **kwargs):
        if args[pool_arg].dtype == jnp.uint16:
            return "a pool of bf16 words (uint16) is read by the XLA reference only"
        return unsupported(*args, **kwargs)
    return check


def _gpu_attention_support(*args, page_order="rows", **kwargs):
    if page_order != "rows":
        return f"the GPU attention kernel reads page_order 'rows', not {page_order!r}"
    return paged_attention_gpu.unsupported_reason(*args, **kwargs)


paged_attention = Op("paged_attention", paged_attention_module.paged_attention_ref,
                     _pallas(gpu=_without("page_order", paged_attention_gpu.paged_attention_gpu),
                             tpu=paged_attention_tpu.paged_attention_tpu,
                             gpu_unsupported=_values_pool(2, _gpu_attention_support),
                             tpu_unsupported=_values_pool(2, paged_attention_tpu.unsupported_reason)))


write_pages = Op("write_pages", cache_write.write_pages_ref,
                 _pallas(tpu=cache_write.write_pages_tpu, tpu_unsupported=_values_pool(0, _always)))
