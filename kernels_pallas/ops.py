"""The one dispatch point for the kernels: a table from each op's implementation names to kernels.

    impl = ops.impl_for_platform(mesh.devices.flat[0].platform)   # once, by whoever builds the step
    h = ops.grouped_int4_swiglu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, impl=impl)

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
  int4_matmul(x [M, K], packed [N, K/8], scale [N, K/g], *, layout) -> [M, N]
  grouped_int4_swiglu(x [M, K], gate_packed, gate_scale, up_packed, up_scale [E, I, ...], group_sizes [E],
                      *, layout)
  grouped_int4_matmul(h [M, I], packed [E, D, I/8], scale [E, D, I/g], group_sizes [E], *, layout) -> [M, D]
  grouped_matmul(x [M, K], w [E, N, K], group_sizes [E]) -> [M, N]     dense experts (`ragged_dot`)
  dequantize_int4(packed [..., N, K/8], scale [..., N, K/g], k, dtype) -> [..., N, k]
  paged_attention(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale, kv_layout)
  write_pages(kv_pages, page [N], slot [N], rows [N, r + p], *, kv_layout) -> kv_pages (tokens into the cache)
      -> o_lat [R, C, H, r]

`layout` (INT4 ops, default "ct"): where the expert words and scales sit (layout.py); the shapes
above are "ct"'s, "tpu" holds [.., K/8, N] and [.., K/g, N]. The GPU kernels read "ct", the TPU
kernels both ("tpu" without copies: `layout.layout_for(platform)`). `kv_layout` (default "rows"):
the cache pages, [P, S, r + p] or "lanes" [P, r + p, S] (paged_attention.py), the GPU kernel reads
"rows", the TPU kernel both ("lanes" with S a multiple of 128 without copies).

When an op has no kernel for `impl`, or its kernel's support predicate rejects the arguments (a
group size that is not a power of two, a head width Triton cannot tile), the reference runs
instead and the first such fallback per (op, impl, reason) is logged. Kernels take unsharded
arrays: under a mesh, call them inside `jax.shard_map(..., check_vma=False)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

# Module aliases: the ops below take the names of int4_matmul and paged_attention.
from kernels_pallas import cache_write, dequant, int4_gpu, int4_tpu, paged_attention_gpu, paged_attention_tpu
from kernels_pallas import grouped_moe as grouped
from kernels_pallas import int4_matmul as int4_matmul_module
from kernels_pallas import paged_attention as paged_attention_module
from kernels_pallas.int4 import dequantize_int4_ref
from kernels_pallas.layout import features, scale_groups

__all__ = ["IMPLS", "impl_for_platform", "Op", "Kernel", "int4_matmul", "grouped_int4_swiglu",
           "grouped_int4_matmul", "grouped_matmul", "dequantize_int4", "paged_attention",
           "write_pages"]

IMPLS = ("xla", "pallas_gpu", "pallas_tpu", "interpret_gpu", "interpret_tpu")
_PLATFORM_IMPL = {"cpu": "xla", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu",
                  "tpu": "pallas_tpu"}
_log = logging.getLogger(__name__)
_logged: set = set()


def impl_for_platform(platform: str) -> str:
    """The implementation that runs best on devices of `platform` (a jax Device.platform)."""
    if platform not in _PLATFORM_IMPL:
        raise ValueError(f"no kernel implementation for platform {platform!r}; "
                         f"expected one of {sorted(_PLATFORM_IMPL)}")
    return _PLATFORM_IMPL[platform]


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


def _read_layout(kernel: Callable, keyword: str, default: str, kernels: dict[str, Callable]) -> Callable:
    """One kernel per layout behind one callable: `keyword` (its value, else `default`) picks it;
    a kernel that reads only the default layout is called without the keyword."""
    def call(*args, **kwargs):
        value = kwargs.pop(keyword, default)
        return kernels.get(value, kernel)(*args, **kwargs)
    return call


def _int4_support(backend: str, weights: Callable):
    """Support predicate of the `backend` INT4 kernels; `weights(*args)` -> (K, packed, scale)."""
    def unsupported(*args, layout="ct", **kwargs):
        k, packed, scale = weights(*args)
        if layout == "tpu":
            if backend != "tpu":
                return f"the {backend} kernels read layout 'ct', not 'tpu'"
            n = features(packed, scale, layout)[0]
            return None if n % int4_tpu.LANES == 0 else f"N={n} is not a multiple of {int4_tpu.LANES}"
        n_groups = scale_groups(scale, layout)
        return dequant.unsupported_reason(backend, k, k // n_groups if n_groups else 0)
    return unsupported


def _int4_op(name, reference, gpu, tpu, tpu_layout, weights) -> Op:
    tpu = _read_layout(tpu, "layout", "ct", {"tpu": tpu_layout})
    gpu = _read_layout(gpu, "layout", "ct", {})
    return Op(name, reference, _pallas(gpu, tpu, _int4_support("gpu", weights), _int4_support("tpu", weights)))


int4_matmul = _int4_op("int4_matmul", int4_matmul_module.int4_matmul_ref, int4_gpu.int4_matmul_gpu,
                       int4_matmul_module.int4_matmul_tpu, int4_tpu.int4_matmul_tpu,
                       lambda x, packed, scale: (x.shape[-1], packed, scale))

grouped_int4_swiglu = _int4_op(
    "grouped_int4_swiglu", grouped.grouped_int4_swiglu_ref, int4_gpu.grouped_int4_swiglu_gpu,
    int4_matmul_module.grouped_int4_swiglu_tpu, int4_tpu.grouped_int4_swiglu_tpu,
    lambda x, gp, gs, up, us, sizes: (x.shape[-1], gp, gs))

grouped_int4_matmul = _int4_op(
    "grouped_int4_matmul", grouped.grouped_int4_matmul_ref, int4_gpu.grouped_int4_matmul_gpu,
    int4_matmul_module.grouped_int4_matmul_tpu, int4_tpu.grouped_int4_matmul_tpu,
    lambda h, packed, scale, sizes: (h.shape[-1], packed, scale))

_dequant_weights = lambda packed, scale, k, dtype=None: (k, packed, scale)  # noqa: E731
dequantize_int4 = Op("dequantize_int4", dequantize_int4_ref,
                     _pallas(dequant.dequantize_int4_gpu, dequant.dequantize_int4_tpu,
                             _int4_support("gpu", _dequant_weights), _int4_support("tpu", _dequant_weights)))

# Dense experts: GPU and TPU have a native grouped matmul; XLA:CPU would multiply every row by
# every expert, so the reference gathers experts per row block instead.
_ragged_dot = Kernel(grouped.grouped_matmul_ragged)
grouped_matmul = Op("grouped_matmul", grouped.grouped_matmul_ref,
                    {impl: _ragged_dot for impl in IMPLS if impl != "xla"})

def _gpu_attention_support(*args, kv_layout="rows", **kwargs):
    if kv_layout != "rows":
        return f"the GPU attention kernel reads kv_layout 'rows', not {kv_layout!r}"
    return paged_attention_gpu.unsupported_reason(*args, **kwargs)


paged_attention = Op("paged_attention", paged_attention_module.paged_attention_ref,
                     _pallas(gpu=_read_layout(paged_attention_gpu.paged_attention_gpu, "kv_layout", "rows", {}),
                             tpu=paged_attention_tpu.paged_attention_tpu,
                             gpu_unsupported=_gpu_attention_support,
                             tpu_unsupported=paged_attention_tpu.unsupported_reason))


write_pages = Op("write_pages", cache_write.write_pages_ref,
                 _pallas(tpu=cache_write.write_pages_tpu))
