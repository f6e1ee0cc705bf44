"""What each platform's kernels read best, in one record per platform: the one table of backend choices.

    backend = backends.backend_for(mesh.devices.flat[0].platform)   # once, by whoever builds a program
    ops.grouped_int4_swiglu(..., impl=backend.impl, packing=backend.expert_packing)

A record holds every choice that depends on the platform and on nothing else:

  impl            the kernels (ops.IMPLS): the XLA reference on CPU, Pallas Triton on GPU, Mosaic on TPU
  expert_packing  how INT4 routed experts are packed in device memory (int4_packing.py): "ct", the
                  checkpoint's own, which the GPU kernels and the reference stream as it is; "tpu" on
                  TPU, where the checkpoint's minor dimensions would be copied into another tiling on
                  every call (experts_tpu.py)
  page_order      how a cache page holds its tokens (paged_attention.py): "rows", a token per row,
                  except on TPU: "lanes", a token per lane column, so the 576-wide rows of K2 do not
                  make XLA relayout the whole pool (paged_attention_tpu.py, cache_write.py)
  cache_words     whether a bf16 cache pool is stored as its raw 16-bit words (uint16): on CPU, where
                  XLA converts a whole bf16 array to float32 for each gather, scatter or update in
                  it, a bf16 pool cost three whole-pool conversions per layer and decode step, so a
                  step's cost grew with the pool rather than the rows (paged_attention.pool_values)
  page_size       tokens per cache page by default: on TPU 128, one lane tile of "lanes" pages;
                  elsewhere 64, since requests share only whole pages of a common prefix and smaller
                  pages share more of it

The fields are chosen together because they must agree: the TPU kernels read only "tpu" experts
and want "lanes" pages of a multiple of 128 tokens, so a table per field could pair a TPU impl
with pages it falls back on. Callers may still override one field (a test forcing the interpreted
GPU kernels on CPU, a benchmark comparing page sizes); ops then says, per call, when a kernel
cannot take its arguments and the reference runs instead.

kimi_jax reads this table (the engine, the loader, the converter and the planner pick a record
once from their devices' platform); nothing here imports kimi_jax.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Backend", "BACKENDS", "backend_for"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """The kernels and memory formats of one platform (see the module docstring)."""

    platform: str
    impl: str
    expert_packing: str
    page_order: str
    page_size: int
    cache_words: bool = False


BACKENDS = {
    "cpu": Backend("cpu", impl="xla", expert_packing="ct", page_order="rows", page_size=64,
                   cache_words=True),
    "gpu": Backend("gpu", impl="pallas_gpu", expert_packing="ct", page_order="rows", page_size=64),
    "tpu": Backend("tpu", impl="pallas_tpu", expert_packing="tpu", page_order="lanes", page_size=128),
}
# jax.Device.platform names GPUs by their runtime on some installs.
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def backend_for(platform: str) -> Backend:
    """The record for devices of `platform` (a jax Device.platform: "cpu", "gpu", "cuda", "tpu", ...)."""
    name = _ALIASES.get(platform, platform)
    if name not in BACKENDS:
        raise ValueError(f"no kernels for platform {platform!r}; expected one of "
                         f"{sorted([*BACKENDS, *_ALIASES])}")
    return BACKENDS[name]
