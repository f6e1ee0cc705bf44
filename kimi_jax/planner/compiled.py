"""Temporaries of the runtime's own programs, from an ahead-of-time compile for the target.

`compile_steps` lowers and compiles `steps.prefill_step` (one row of a prompt chunk) and
`steps.decode_steps` (the engine's full decode block) for a mesh of the target's devices, with the
kernels, expert layout and cache pages the runtime uses there, and reads XLA's memory analysis.

Every layer of K2 is its own code (model.py), so compile time grows with the layer count: a full
61-layer compile for a TPU takes ~9 minutes on a 2-core host. `scaled_temporaries` compiles the
model cut to its dense layers plus one and plus two MoE layers, and extrapolates linearly in the
MoE layers (what a layer adds is the same for every MoE layer); `layers="all"` compiles the whole
model instead. BENCHMARKS.md records both for K2 on TPU v5p.
"""

from __future__ import annotations

import contextlib
import re
import time

GIB = 2**30
# How the TPU compiler refuses a program that exceeds HBM; its figure counts parameters and cache too.
_HBM_REFUSAL = re.compile(r"HLO temporaries \(([\d.]+)G\)")


@contextlib.contextmanager
def _persistent_cache_off(off: bool):
    """An executable compiled for a described topology (no such device here) cannot be loaded back,
    so JAX's on-disk compilation cache must neither store nor look up these programs."""
    if not off:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # it remembers whether it is in use; make it ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def compile_steps(cfg, *, devices, mesh_text: str, max_len: int, batch: int, chunk: int, dtype="bfloat16",
                  steps=("prefill", "decode"), progress=None):
    """Lower and compile the prefill and decode steps of the abstract model for `devices`.

    Returns (info, compiled: name -> executable or the compiler's refusal, state, cache), with
    `state` and `cache` the placed abstract inputs. `progress(text)` hears of each compile."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kimi_jax.planner.memory import abstract_cache, backend, placed
    from kimi_jax.sampling import SamplingParams, knob_arrays
    from kimi_jax.scheduler import DEFAULT_DECODE_BLOCK
    from kimi_jax.sharding import MeshSpec, make_mesh
    from kimi_jax.steps import SlotState, decode_steps, prefill_step, split_state

    spec = MeshSpec.parse(mesh_text)
    mesh = make_mesh(spec, devices)
    platform = devices[0].platform
    be = backend(cfg, platform)
    graphdef, state = placed(cfg, mesh, dtype=dtype, expert_packing=be.expert_packing)
    model_def, weights = split_state(graphdef, state)
    cache = abstract_cache(cfg, mesh, spec, batch=batch, max_len=max_len, dtype=dtype, be=be)
    rep = NamedSharding(mesh, P())
    sds = jax.ShapeDtypeStruct
    ints = lambda *shape: sds(shape, jnp.int32, sharding=rep)  # noqa: E731
    knobs = {k: sds(v.shape, v.dtype, sharding=rep) for k, v in knob_arrays([SamplingParams()] * batch).items()}
    slots = SlotState.abstract(batch, rep)
    info = {"mesh": str(spec), "devices": len(devices), "device_kind": devices[0].device_kind, "batch": batch,
            "max_len": max_len, "page_size": be.page_size, "pages": cache.n_pages, "dtype": jnp.dtype(dtype).name,
            "kernels": be.impl, "expert_packing": be.expert_packing, "page_order": be.page_order,
            "decode_block": DEFAULT_DECODE_BLOCK, "compile_seconds": {}}
    lowerings = {
        "prefill": lambda: prefill_step.lower(model_def, weights, cache, slots, ints(1, chunk), ints(1), ints(1),
                                              ints(1), ints(1), knobs, impl=be.impl),
        "decode": lambda: decode_steps.lower(model_def, weights, cache, slots, ints(batch), ints(), knobs,
                                             max_steps=DEFAULT_DECODE_BLOCK, impl=be.impl),
    }
    compiled = {}
    with jax.set_mesh(mesh), _persistent_cache_off(platform != jax.default_backend()):
        for name in steps:
            t0 = time.perf_counter()
            try:
                compiled[name] = lowerings[name]().compile()
            except Exception as e:  # the TPU compiler refuses programs that exceed HBM: that is an answer
                if not _HBM_REFUSAL.search(str(e)):
                    raise
                compiled[name] = e
            info["compile_seconds"][name] = round(time.perf_counter() - t0, 1)
            if progress:
                progress(f"{name} with {cfg.num_hidden_layers} layers: {info['compile_seconds'][name]} s")
    return info, compiled, state, cache


def temp_bytes(result, argument_bytes: int) -> int:
    """Temporaries of a compiled program; for the compiler's refusal, its total less the arguments."""
    if isinstance(result, Exception):
        return int(float(_HBM_REFUSAL.search(str(result)).group(1)) * GIB) - argument_bytes
    mem = result.memory_analysis()
    return int(mem.temp_size_in_bytes) if mem is not None else 0


def scaled_layers(cfg) -> tuple[int, int] | None:
    """The two cut layer counts to compile (the dense layers plus one and two MoE layers), or None
    when the model is no bigger than that."""
    first = cfg.first_k_dense_replace if cfg.n_moe_layers else 0
    small, large = first + 1, first + 2
    return (small, large) if cfg.num_hidden_layers > large else None


def temporaries(cfg, *, devices, mesh_text: str, max_len: int, batch: int, chunk: int, dtype: str,
                layers: str = "scaled", progress=None) -> dict:
    """{"prefill", "decode"} temporary bytes per device, "how" they were obtained, "seconds" spent
    compiling, and "refused" (the compiler's message where the whole model exceeds the device)."""
    from kimi_jax.planner.memory import shard_bytes

    kw = dict(devices=devices, mesh_text=mesh_text, max_len=max_len, batch=batch, chunk=chunk, dtype=dtype,
              progress=progress)
    where = f"{devices[0].device_kind}" if devices[0].platform != "cpu" else "XLA:CPU"
    cut = scaled_layers(cfg) if layers == "scaled" else None
    t0 = time.perf_counter()
    if cut is None:
        _, compiled, state, cache = compile_steps(cfg, **kw)
        import jax

        args = sum(shard_bytes(x) for x in jax.tree.leaves(state)) + sum(shard_bytes(x) for x in jax.tree.leaves(cache))
        out = {name: temp_bytes(r, args) for name, r in compiled.items()}
        out["refused"] = {name: str(r).splitlines()[0][:300] for name, r in compiled.items() if isinstance(r, Exception)}
        out["how"] = f"compiled for {where}, all {cfg.num_hidden_layers} layers"
    else:
        small, large = ({name: temp_bytes(r, 0) for name, r in compile_steps(cfg.replace(num_hidden_layers=n),
                                                                              **kw)[1].items()} for n in cut)
        extra = cfg.num_hidden_layers - cut[1]
        out = {name: large[name] + extra * max(0, large[name] - small[name]) for name in small}
        out["refused"] = {}
        out["how"] = (f"compiled for {where} with {cut[0]} and {cut[1]} of {cfg.num_hidden_layers} layers, "
                      f"extrapolated by what one MoE layer adds")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
