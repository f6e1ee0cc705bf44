"""`python -m kimi_jax.plan`: will a K2 config fit a machine? A memory plan from an AOT compile.

Nothing is allocated: the model is built from abstract arrays (`jax.ShapeDtypeStruct`, INT4 experts
packed), placed on a mesh of fake host devices, and the prefill and decode programs are lowered and
compiled for it. Per device we report the weight bytes and cache bytes (exact, from the shardings)
and the temporary bytes XLA's memory analysis gives for each compiled program, then the largest
context that fits a given HBM size for several batch sizes.

    python -m kimi_jax.plan --config k2-thinking --devices 8 --hbm-gb 141 --max-len 262144

The compile runs on the host CPU backend, so temporaries are those of the XLA lowering with the
Pallas kernels replaced by their XLA references; the weight and cache figures are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

GIB = 2**30
# HBM per device in bytes. GPU hosts (for --target cpu plans) by name; TPU devices by the
# device_kind libtpu reports (a TPU7x chip shows as two devices of ~96 GiB).
GPU_HOSTS = {"8x H200": (8, 141e9), "8x H100": (8, 80e9), "8x B200": (8, 180e9)}
TPU_HBM = {"TPU v5": 95 * GIB, "TPU v5 lite": 16 * GIB, "TPU v6 lite": 32 * GIB, "TPU7x": 94.75 * GIB}


def _set_device_count(n: int) -> None:
    """Fake host devices must be requested before JAX initializes its CPU backend."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < n:
            from kimi_jax.errors import KimiError

            raise KimiError(f"JAX is already running with {jax.device_count()} devices; --devices {n} needs a "
                            "fresh process")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _shard_bytes(x) -> int:
    shard = x.sharding.shard_shape(x.shape)
    return math.prod(shard) * x.dtype.itemsize


def target_devices(target: str, devices: int):
    """The devices to compile for: fake host CPUs, or a TPU topology described by libtpu (no TPU
    needed: the TPU compiler runs on the host, so temporaries are the TPU program's own)."""
    import jax

    if target == "cpu":
        return jax.devices("cpu")[:devices]
    from jax.experimental import topologies

    from kimi_jax.errors import KimiError

    try:
        return topologies.get_topology_desc(topology_name=target, platform="tpu").devices
    except Exception as e:  # missing libtpu or an unknown topology name
        raise KimiError(f"--target {target}: cannot describe this TPU topology ({str(e).splitlines()[0]}); "
                        "install libtpu matching your jax, e.g. pip install 'jax[tpu]'") from None


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


def compile_steps(cfg, *, devices, mesh_text: str | None, max_len: int, batch: int, chunk: int,
                  dtype="bfloat16", page_size: int | None = None, steps=("prefill", "decode")):
    """Lower and compile the prefill and decode steps of the abstract model for `devices`.

    Returns (info, compiled: name -> executable or the compiler's refusal, state, cache), with
    `state` and `cache` the placed abstract inputs. Layouts and kernels are what the runtime uses on
    these devices: on TPU lane-dense experts, "lanes" cache pages and the Mosaic kernels."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kernels_pallas.backends import backend_for
    from kimi_jax.cache import PagedCache, default_pool_pages
    from kimi_jax.model import abstract_model, expert_packing_for
    from kimi_jax.sampling import SamplingParams, knob_arrays
    from kimi_jax.scheduler import DEFAULT_DECODE_BLOCK
    from kimi_jax.sharding import MeshSpec, default_mesh_spec, make_mesh, placed_abstract
    from kimi_jax.steps import SlotState, decode_steps, prefill_step, split_state

    spec = MeshSpec.parse(mesh_text) if mesh_text else default_mesh_spec(cfg, len(devices))
    mesh = make_mesh(spec, devices)
    jdtype = jnp.dtype(dtype)
    platform = devices[0].platform
    backend = backend_for(platform)
    expert_packing = expert_packing_for(cfg, backend)
    page_order, page_size = backend.page_order, page_size or backend.page_size
    graphdef, state = abstract_model(cfg, jdtype, expert_packing=expert_packing)
    state = placed_abstract(state, mesh)
    model_def, weights = split_state(graphdef, state)
    n_pages = default_pool_pages(batch, max_len, page_size, spec.data)  # what the engine allocates
    cache = PagedCache.abstract(cfg, slots=batch, max_len=max_len, page_size=page_size, n_pages=n_pages,
                                dtype=jdtype, mesh=mesh, page_order=page_order, words=backend.cache_words)
    rep = NamedSharding(mesh, P())
    sds = jax.ShapeDtypeStruct
    ints = lambda *shape: sds(shape, jnp.int32, sharding=rep)  # noqa: E731
    knobs = {k: sds(v.shape, v.dtype, sharding=rep) for k, v in knob_arrays([SamplingParams()] * batch).items()}
    slots = SlotState.abstract(batch, rep)
    impl = backend.impl  # Mosaic kernels for a TPU target, the XLA path on CPU
    info = {"mesh": str(spec), "devices": len(devices), "device_kind": devices[0].device_kind, "batch": batch,
            "max_len": max_len, "page_size": page_size, "pages": n_pages, "dtype": jdtype.name, "kernels": impl,
            "expert_packing": expert_packing, "page_order": page_order, "decode_block": DEFAULT_DECODE_BLOCK,
            "compile_seconds": {}}
    lowerings = {
        "prefill": lambda: prefill_step.lower(model_def, weights, cache, slots, ints(1, chunk), ints(1), ints(1),
                                              ints(1), ints(1), knobs, impl=impl),
        "decode": lambda: decode_steps.lower(model_def, weights, cache, slots, ints(batch), ints(), knobs,
                                             max_steps=DEFAULT_DECODE_BLOCK, impl=impl),
    }
    compiled = {}
    with jax.set_mesh(mesh), _persistent_cache_off(platform != jax.default_backend()):
        for name in steps:
            lower = lowerings[name]
            t0 = time.perf_counter()
            try:
                compiled[name] = lower().compile()
            except Exception as e:  # the TPU compiler refuses programs that exceed HBM: that is an answer
                if not _HBM_REFUSAL.search(str(e)):
                    raise
                compiled[name] = e
            info["compile_seconds"][name] = round(time.perf_counter() - t0, 1)
    return info, compiled, state, cache


def plan(cfg, *, devices, mesh_text: str | None, max_len: int, batch: int, chunk: int, dtype="bfloat16",
         page_size: int | None = None):
    """Per-device weight, cache and compiled temporary bytes of the runtime's steps (see module doc)."""
    import jax
    from flax import nnx

    from kimi_jax.quant import is_routed_expert

    out, compiled, state, cache = compile_steps(cfg, devices=devices, mesh_text=mesh_text, max_len=max_len,
                                                batch=batch, chunk=chunk, dtype=dtype, page_size=page_size)
    out["config"] = cfg.model_type
    weights = sum(_shard_bytes(x) for x in jax.tree.leaves(state))
    experts = sum(_shard_bytes(x) for p, v in nnx.to_flat_state(state)
                  if is_routed_expert(p, v)
                  for x in jax.tree.leaves(v.get_value()))
    cache_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(cache))
    pool_bytes = sum(_shard_bytes(x) for x in cache.pages)
    for name, result in compiled.items():
        if isinstance(result, Exception):
            need = _HBM_REFUSAL.search(str(result))  # a total: keep it apart from the temporaries
            out[f"{name}_total_bytes_required"] = int(float(need.group(1)) * GIB)
            out[f"{name}_temp_bytes"] = out[f"{name}_total_bytes_required"] - weights - cache_bytes
            out[f"{name}_error"] = str(result).splitlines()[0][:300]
        else:
            mem = result.memory_analysis()
            out[f"{name}_temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
    out.update(weight_bytes=weights, expert_weight_bytes=experts, cache_bytes=cache_bytes,
               # per device, per token of one sequence's context (sequences are split over `data`)
               cache_bytes_per_token_per_row=pool_bytes / (out["pages"] * out["page_size"]))
    return out


def fits(p, hbm_bytes: float, batches=(1, 2, 4, 8, 16, 32, 64)):
    """Largest context per batch size that fits `hbm_bytes` per device with the engine's default
    page pool (cache.default_pool_pages: room for the prefix cache too)."""
    from kimi_jax.cache import POOL_SEQUENCES_PER_SLOT

    temp = max(p["prefill_temp_bytes"] or 0, p["decode_temp_bytes"] or 0)
    free = hbm_bytes - p["weight_bytes"] - temp
    result = {}
    for b in batches:
        tokens = free / (p["cache_bytes_per_token_per_row"] * POOL_SEQUENCES_PER_SLOT * b) if free > 0 else 0
        result[b] = int(tokens) if tokens >= 1 else 0
    return result


def _targets(p, args) -> dict[str, float]:
    """HBM per device to fit against: --hbm-gb, the TPU's own, or the GPU hosts of that size."""
    if args.hbm_gb:
        return {f"{args.hbm_gb:g} GB": args.hbm_gb * 1e9}
    if args.target != "cpu":
        return {p["device_kind"]: TPU_HBM[p["device_kind"]]} if p["device_kind"] in TPU_HBM else {}
    return {name: hbm for name, (n, hbm) in GPU_HOSTS.items() if n == p["devices"]}


def _add_fits(p, args) -> None:
    batches = sorted({1, 2, 4, 8, 16, 32, 64, args.batch})
    p["fits"] = {name: fits(p, hbm, batches) for name, hbm in _targets(p, args).items()}


def _best_plan(cfg, devices, args):
    """Plan every mesh the devices can form; return the one leaving the longest context at
    --batch on the first HBM target (the least weight memory per device when there is none),
    with a summary of all in `candidates`."""
    from kimi_jax.errors import KimiError
    from kimi_jax.sharding import mesh_candidates

    plans = []
    for spec in mesh_candidates(cfg, len(devices), args.batch):
        try:
            p = plan(cfg, devices=devices, mesh_text=str(spec), max_len=args.max_len, batch=args.batch,
                     chunk=args.chunk, dtype=args.dtype)
        except KimiError as e:  # a dimension this mesh cannot split
            print(f"mesh {spec}: skipped ({e})", file=sys.stderr)
            continue
        _add_fits(p, args)
        first = next(iter(p["fits"].values()), None)
        p["context"] = first[args.batch] if first is not None else None
        print(f"mesh {spec}: planned", file=sys.stderr)
        plans.append(p)
    if not plans:
        raise KimiError(f"no mesh of {len(devices)} devices can shard this config")
    best = max(plans, key=lambda p: (p["context"] or 0, -p["weight_bytes"]))
    best["candidates"] = [{"mesh": p["mesh"], "weight_bytes": p["weight_bytes"], "context": p["context"]}
                          for p in plans]
    return best


def _gb(x) -> str:
    return f"{x / 1e9:,.2f} GB"


def main(argv=None) -> int:
    from kimi_jax.scheduler import DEFAULT_CHUNK

    ap = argparse.ArgumentParser(prog="python -m kimi_jax.plan", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="k2-thinking", help="preset name (k2-thinking, tiny) or a config.json path")
    ap.add_argument("--devices", type=int, default=8, help="devices of the target host (--target cpu)")
    ap.add_argument("--target", default="cpu", help="'cpu' (fake host devices; XLA:CPU upcasts bf16 weights to "
                                                  "f32, inflating temporaries) or a TPU topology such as "
                                                  "v5p:2x2x1 or v6e:2x4 (needs libtpu)")
    ap.add_argument("--mesh", help="data=..,expert=..,tensor=.. (default: try every split of the devices and "
                                   "report the one that leaves the longest context)")
    ap.add_argument("--hbm-gb", type=float, default=None, help="HBM per device in GB to fit against")
    ap.add_argument("--max-len", type=int, default=262144, help="cache capacity in tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prefill chunk size (the runtime's)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from kimi_jax.errors import KimiError

    try:
        if args.devices < 1 or args.batch < 1 or args.max_len < 1:
            raise KimiError("--devices, --batch and --max-len must be >= 1")
        if args.target == "cpu":
            _set_device_count(args.devices)
        else:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU, run nothing on it
        from kimi_jax.config import Config, get_preset

        cfg = Config.from_hf(args.config) if os.path.exists(args.config) else get_preset(args.config)
        devices = target_devices(args.target, args.devices)
        if args.mesh:
            p = plan(cfg, devices=devices, mesh_text=args.mesh, max_len=args.max_len, batch=args.batch,
                     chunk=args.chunk, dtype=args.dtype)
            _add_fits(p, args)
        else:
            p = _best_plan(cfg, devices, args)
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p))
        return 0
    for c in p.get("candidates", []):
        print(f"mesh {c['mesh']}: weights {_gb(c['weight_bytes'])}/device, "
              + (f"longest context at batch {args.batch}: {c['context']:,} tokens" if c["context"] is not None
                 else "no HBM size to fit against")
              + ("  <- best" if c["mesh"] == p["mesh"] else ""))
    print(f"{args.config} on {p['devices']} x {p['device_kind']}, mesh {p['mesh']}, batch {p['batch']}, cache {p['max_len']:,} "
          f"tokens ({p['dtype']})")
    print("| per device | bytes |\n|---|---|")
    print(f"| weights (routed experts) | {_gb(p['weight_bytes'])} ({_gb(p['expert_weight_bytes'])}) |")
    print(f"| latent cache: the engine's pool of {p['pages']:,} pages (batch {p['batch']} x {p['max_len']:,} tokens, "
          f"and as much again for cached prefixes) | {_gb(p['cache_bytes'])} |")
    print(f"| prefill temporaries (chunk {args.chunk}) | {_gb(p['prefill_temp_bytes'] or 0)} |")
    print(f"| decode temporaries | {_gb(p['decode_temp_bytes'] or 0)} |")
    for name in ("prefill", "decode"):
        if p.get(f"{name}_error"):
            print(f"{name} does not fit this device: {p[f'{name}_error']}")
    if args.target == "cpu":
        print("note: XLA:CPU converts bf16 weights to f32 around its dots, so CPU temporaries overstate "
              "what a GPU or TPU needs; use a TPU --target for compiled temporaries")
    print(f"compile: prefill {p['compile_seconds']['prefill']}s, decode {p['compile_seconds']['decode']}s")
    for name, table in p["fits"].items():
        cells = ", ".join(f"batch {b}: {t:,}" for b, t in table.items())
        print(f"largest context per sequence on {name} per device: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
