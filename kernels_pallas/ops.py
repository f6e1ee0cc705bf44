"""The one dispatch point for the INT4 ops: Pallas on TPU and GPU, the XLA reference elsewhere.

    ops.int4_matmul(x, packed, scale)
    ops.grouped_int4_swiglu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, expert_base=0)
    ops.grouped_int4_matmul(h, packed, scale, group_sizes, expert_base=0)
    ops.dequantize_int4(packed, scale, k, dtype)

Implementations: "xla" (pure jnp reference), "pallas_tpu", "pallas_gpu", "interpret_tpu" (the TPU
kernel under TPU interpret mode, which simulates VMEM/DMA and poisons uninitialized memory),
"interpret_gpu" (the GPU kernel under the generic interpreter). Aliases: "pallas" = the kernel of
the running platform, "interpret" = "interpret_gpu" (the quicker interpreter), "auto" = pallas on
TPU/GPU, else xla. Choose with `impl=` on a call or `with ops.use_impl(...)`; `selected_impl()`
names what a call would run. A kernel that does not support a shape (e.g. a group size that is not
a power of two on GPU) falls back to the reference.

Kernels take unsharded arrays: under a mesh, call them inside `jax.shard_map(..., check_vma=False)`.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp

from kernels_pallas import dequant as _dequant
from kernels_pallas import grouped_moe as _grouped
from kernels_pallas import paged_attention as _paged
from kernels_pallas.int4 import dequantize_int4_ref

# By function: the package re-exports `int4_matmul`, which shadows the module of the same name.
from kernels_pallas.int4_matmul import int4_matmul as _int4_matmul_kernel
from kernels_pallas.int4_matmul import int4_matmul_ref

IMPLS = ("xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
ALIASES = ("auto", "pallas", "interpret")

_state = threading.local()


@contextlib.contextmanager
def use_impl(impl: str):
    """Force an implementation inside the block (tests, benchmarks). Nests; thread-local."""
    _check(impl)
    prev = getattr(_state, "impl", None)
    _state.impl = impl
    try:
        yield
    finally:
        _state.impl = prev


def _check(impl):
    if impl not in IMPLS + ALIASES:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS + ALIASES}")


def selected_impl(impl: str | None = None) -> str:
    """The concrete implementation an op would use now: argument > `use_impl` > platform."""
    name = impl or getattr(_state, "impl", None) or "auto"
    _check(name)
    platform = target_platform()
    kind = "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda", "rocm") else None
    if name == "auto":
        return f"pallas_{kind}" if kind else "xla"
    if name == "pallas":
        if kind is None:
            raise RuntimeError(f"no Pallas kernel for platform {platform!r}; use 'interpret' or 'xla'")
        return f"pallas_{kind}"
    if name == "interpret":
        return "interpret_gpu"
    return name


def target_platform() -> str:
    """The platform being compiled for: the context mesh's devices when a mesh is set (an AOT
    compile for a TPU topology runs on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def indexes_layer_stacks(impl: str | None = None) -> bool:
    """Whether a model should pass the grouped ops its whole layer stack of expert weights with an
    `expert_base` (True), or slice out one layer's experts for each call (False).

    GPU, CPU and the interpreters: the stack. There, slicing a layer out of a parameter makes
    XLA copy the slice — all of the layer's experts, 8.4 GB for K2 — before a custom call reads it.
    Mosaic TPU: one layer, for now. XLA:TPU keeps arrays whose minor dimension is not a multiple
    of 128 (the scales, K/32 = 224 columns; down_proj split over `tensor`, 32 words) in a
    transposed layout and copies them to the row-major layout the kernel reads; over the whole
    stack that copy holds every layer at once (135 GB per device for K2 at tensor=8, measured by
    the TPU compiler), over a slice only one. The lasting fix is a TPU storage layout for the
    experts whose minor dimension is wide (UNVERIFIED on hardware; no TPU has run these kernels)."""
    return selected_impl(impl) != "pallas_tpu"


def _kernel_args(impl: str):
    """-> (backend, interpret) for a kernel impl, None for the reference."""
    if impl == "xla":
        return None
    backend = impl.split("_")[1]
    if not impl.startswith("interpret"):
        return backend, False
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return backend, pltpu.InterpretParams()
    return backend, True


def int4_matmul(x, packed, scale, *, impl: str | None = None):
    """x [M, K] @ dequant(packed [N, K/8], scale [N, K/g])^T -> [M, N] in x.dtype."""
    args = _kernel_args(selected_impl(impl))
    if args is None or not _dequant.supports(args[0], x.shape[-1], x.shape[-1] // scale.shape[-1]):
        return int4_matmul_ref(x, packed, scale)
    return _int4_matmul_kernel(x, packed, scale, backend=args[0], interpret=args[1])


def grouped_int4_swiglu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, *, expert_base=0,
                        impl: str | None = None):
    """silu(x @ Wg[b+e]^T) * (x @ Wu[b+e]^T) for rows sorted by expert e, b = expert_base;
    [M, K] -> [M, I] in x.dtype."""
    args = _kernel_args(selected_impl(impl))
    if args is None or not _dequant.supports(args[0], x.shape[-1], x.shape[-1] // gate_scale.shape[-1]):
        return _grouped.grouped_int4_swiglu_ref(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes,
                                                expert_base)
    return _grouped.grouped_int4_swiglu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes,
                                        backend=args[0], interpret=args[1], expert_base=expert_base)


def grouped_int4_matmul(h, packed, scale, group_sizes, *, expert_base=0, impl: str | None = None):
    """h @ W[b+e]^T for rows sorted by expert e, b = expert_base; [M, I] -> [M, D] in h.dtype."""
    args = _kernel_args(selected_impl(impl))
    if args is None or not _dequant.supports(args[0], h.shape[-1], h.shape[-1] // scale.shape[-1]):
        return _grouped.grouped_int4_matmul_ref(h, packed, scale, group_sizes, expert_base)
    return _grouped.grouped_int4_matmul(h, packed, scale, group_sizes, backend=args[0], interpret=args[1],
                                        expert_base=expert_base)


def dequantize_int4(packed, scale, k: int, dtype=jnp.bfloat16, *, impl: str | None = None):
    """packed [..., N, K/8], scale [..., N, K/g] -> [..., N, k] in dtype."""
    args = _kernel_args(selected_impl(impl))
    if args is None or not _dequant.supports(args[0], k, k // scale.shape[-1]):
        return dequantize_int4_ref(packed, scale, k, dtype)
    return _dequant.dequantize_int4(packed, scale, k=k, dtype=dtype, backend=args[0], interpret=args[1])


def paged_attention(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale: float, block_pages=None,
                    n_blocks=None, impl: str | None = None):
    """Absorbed-MLA attention over a paged latent cache (see paged_attention.py) -> [R, C, H, r] f32.
    No kernel yet: every implementation runs the reference."""
    del impl
    return _paged.paged_attention_ref(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, scale=scale,
                                      block_pages=block_pages, n_blocks=n_blocks)
