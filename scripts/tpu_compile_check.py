"""Does the TPU compile of a decode step copy expert weights or the latent cache? Asked of libtpu's
compiler, no TPU needed (pip install 'jax[tpu]' for libtpu).

Compiles, for a TPU topology and a mesh, one routed-expert block the way the model runs it (each
device's experts and its slice of their hidden units, router-sorted rows in through
kimi_jax.moe.dispatch, the Mosaic kernels inside shard_map, psum out), the paged decode attention
and the paged attention of one prefill chunk of the runtime's size (its C * heads queries run in
query blocks: the kernel, not the XLA reference, takes them), then walks the optimized HLO for copies, transposes, bitcast-converts and loop fusions
whose result has the shape of an expert weight, a scale or the cache pool, and reads the
temporaries from the compiled memory analysis.

    python scripts/tpu_compile_check.py --target v5p:2x2x2 --mesh tensor=8 --config k2
    python scripts/tpu_compile_check.py --target tpu7x:2x2x1 --config k2 --packing ct --page-order rows

--packing ct / --page-order rows compile the checkpoint's INT4 packing (which no TPU kernel reads:
its experts go through the XLA reference) and the row-per-token pages instead, the "before" of
this check. --schedule DIR keeps libtpu's dumps in DIR and prints, per Mosaic
kernel, the static schedule of its innermost loop body (VLIW bundles and the slots they fill): the
compiler's own count of what a step costs, the nearest thing to a timing without a TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU, run nothing on it
# Other JAX processes on this host may hold libtpu's lock file; the compiler needs no device.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

COPYING_OPS = ("copy", "copy-start", "transpose", "bitcast-convert")
KERNELS = ("int4_swiglu_tpu", "int4_matmul_tpu",
           "paged_mla_attention_tpu")


@dataclasses.dataclass(frozen=True)
class Dims:
    """What the check compiles: model dims, one decode batch and its cache."""
    hidden: int  # d: gate/up input, down output
    expert_hidden: int  # f: gate/up output, down input (split over `tensor`)
    experts: int
    top_k: int
    tokens: int  # decode rows of one step
    heads: int
    lora: int = 512  # r, the latent width
    rope: int = 64  # p
    group: int = 32
    page: int = 128
    context: int = 1024  # cached tokens per row
    chunk: int = 128  # prompt tokens of one prefill row (scheduler.DEFAULT_CHUNK)


CONFIGS = {
    # K2 Thinking's shapes: one layer, batch 8 at 4K context.
    "k2": Dims(hidden=7168, expert_hidden=2048, experts=384, top_k=8, tokens=8, heads=64, context=4096),
    # Small, yet every checkpoint-packing minor dim misses 128 under tensor=8 (scales 16, down words 32).
    "tiny": Dims(hidden=512, expert_hidden=2048, experts=64, top_k=4, tokens=4, heads=64, context=512),
}


def expert_arrays(dims: Dims, packing: str):
    """Global abstract shapes of one layer's (packed, scale) gate, up, down and their specs."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    e, d, f, g = dims.experts, dims.hidden, dims.expert_hidden, dims.group
    if packing == "tpu":  # [E, K/8, N], [E, K/g, N]
        gate = ((e, d // 8, f), (e, d // g, f), P("expert", None, "tensor"))
        down = ((e, f // 8, d), (e, f // g, d), P("expert", "tensor", None))
    else:  # checkpoint [E, N, K/8], [E, N, K/g]
        gate = ((e, f, d // 8), (e, f, d // g), P("expert", "tensor", None))
        down = ((e, d, f // 8), (e, d, f // g), P("expert", None, "tensor"))
    return [(jnp.int32, p, jnp.bfloat16, s, spec) for p, s, spec in (gate, gate, down)]


def moe_block(dims: Dims, mesh, packing: str):
    """(function, abstract args) of one routed-expert block, sharded as the model shards it."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kernels_pallas import ops
    from kimi_jax.moe import dispatch

    arrays = expert_arrays(dims, packing)
    n_local = dims.experts // mesh.shape["expert"]

    def ffn(xs, sizes, gp, gs, up, us, dp, ds):
        h = ops.grouped_int4_swiglu(xs, gp, gs, up, us, sizes, packing=packing, impl="pallas_tpu")
        return ops.grouped_int4_matmul(h, dp, ds, sizes, packing=packing, impl="pallas_tpu")

    def body(x, w, idx, *weights):
        offset = jax.lax.axis_index("expert") * n_local
        y = dispatch(x, w, idx, n_local, lambda xs, sizes: ffn(xs, sizes, *weights), offset)
        return jax.lax.psum(y, ("expert", "tensor"))

    specs = [spec for *_, spec in arrays for _ in range(2)]
    block = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), *specs), out_specs=P(), check_vma=False)
    sds = jax.ShapeDtypeStruct
    rep = NamedSharding(mesh, P())
    args = [sds((dims.tokens, dims.hidden), jnp.bfloat16, sharding=rep),
            sds((dims.tokens, dims.top_k), jnp.float32, sharding=rep),
            sds((dims.tokens, dims.top_k), jnp.int32, sharding=rep)]
    for pdt, pshape, sdt, sshape, spec in arrays:
        args += [sds(pshape, pdt, sharding=NamedSharding(mesh, spec)),
                 sds(sshape, sdt, sharding=NamedSharding(mesh, spec))]
    return block, args


def attention_block(dims: Dims, mesh, page_order: str, prefill: bool = False):
    """(function, abstract args) of the paged attention of a decode step (`dims.tokens` rows of one
    query), or of one prefill row of `dims.chunk` queries: heads over `tensor`, cache shared."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kernels_pallas import ops

    rows, queries = (1, dims.chunk) if prefill else (dims.tokens, 1)
    width = dims.lora + dims.rope
    table_pages = dims.context // dims.page
    pool = (rows * table_pages + 1, dims.page, width) if page_order == "rows" else \
        (rows * table_pages + 1, width, dims.page)
    heads = P(None, None, "tensor", None)

    def body(q_lat, q_pe, kv_pages, table, q_start, kv_len):
        return ops.paged_attention(q_lat, q_pe, kv_pages, table, q_start, kv_len, scale=0.1, page_order=page_order,
                                   impl="pallas_tpu")

    block = jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, P(), P(), P(), P()), out_specs=heads,
                          check_vma=False)
    sds = jax.ShapeDtypeStruct
    rep = NamedSharding(mesh, P())
    args = [sds((rows, queries, dims.heads, dims.lora), jnp.bfloat16, sharding=NamedSharding(mesh, heads)),
            sds((rows, queries, dims.heads, dims.rope), jnp.bfloat16, sharding=NamedSharding(mesh, heads)),
            sds(pool, jnp.bfloat16, sharding=rep), sds((rows, table_pages), jnp.int32, sharding=rep),
            sds((rows,), jnp.int32, sharding=rep), sds((rows,), jnp.int32, sharding=rep)]
    return block, args


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*\(?(\w+)\[([\d,]*)\][^ ]*\s+([\w-]+)\(")


def copies_of(hlo_text: str, shapes) -> list[str]:
    """Instructions of the optimized HLO that copy, transpose, bitcast-convert or loop-fuse a value
    of one of `shapes` (per-device shapes: the text is the partitioned program)."""
    shapes = {tuple(s) for s in shapes}
    found = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, dims, op = m.group(1), m.group(3), m.group(4)
        shape = tuple(int(v) for v in dims.split(",") if v)
        loop_fusion = op == "fusion" and "kind=kLoop" in line
        if shape in shapes and (op in COPYING_OPS or loop_fusion):
            found.append(f"{op} {name} {m.group(2)}[{dims}]")
    return found


def local_shape(shape, spec, mesh) -> tuple[int, ...]:
    """The per-device shape of a global `shape` sharded by `spec` over `mesh`."""
    out = list(shape)
    for i, axes in enumerate(spec):
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            out[i] //= mesh.shape[axis]
    return tuple(out)


def kernels_in(hlo_text: str) -> list[str]:
    """The Mosaic kernels of KERNELS that the optimized HLO calls."""
    return [k for k in KERNELS if re.search(rf"\b{k}\b", hlo_text)]


def compile_report(fn, args, watched) -> dict:
    """Compile `fn` for the args' devices; copies of `watched` shapes and the temporaries."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    return {"copies": copies_of(text, watched), "temp_bytes": int(mem.temp_size_in_bytes),
            "kernels": kernels_in(text),
            "compile_seconds": round(time.perf_counter() - t0, 1)}


def check(target: str, mesh_text: str, dims: Dims, packing: str = "tpu", page_order: str = "lanes") -> dict:
    """Compile both blocks for `target`; see the module docstring."""
    import jax

    from kimi_jax.planner.targets import tpu_topology
    from kimi_jax.sharding import MeshSpec, make_mesh

    spec = MeshSpec.parse(mesh_text)
    devices = tpu_topology(target)
    mesh = make_mesh(spec, devices[:spec.size])
    out = {"target": target, "device_kind": devices[0].device_kind, "mesh": str(spec), "packing": packing,
           "page_order": page_order, "dims": dataclasses.asdict(dims)}
    with jax.set_mesh(mesh):
        fn, args = moe_block(dims, mesh, packing)
        weights = args[3:]
        watched = {local_shape(a.shape, a.sharding.spec, mesh) for a in weights} | {a.shape for a in weights}
        out["moe"] = compile_report(fn, args, watched)
        out["moe"]["expert_slab_bytes"] = sum(
            math.prod(local_shape(a.shape, a.sharding.spec, mesh)) * a.dtype.itemsize for a in weights)
        fn, args = attention_block(dims, mesh, page_order)
        out["attention"] = compile_report(fn, args, {args[2].shape})
        out["attention"]["pool_bytes"] = args[2].size * args[2].dtype.itemsize
        fn, args = attention_block(dims, mesh, page_order, prefill=True)
        out["prefill_attention"] = compile_report(fn, args, {args[2].shape})
    return out


_BUNDLE = re.compile(r"^\s*0x[0-9a-f]+\s+(?:LH|LB|LE|PB|PF|CT)?:?\s*(>*)")


def schedule_summary(dump_dir: str, kernel: str) -> dict | None:
    """`kernel`'s bundles by loop nesting depth (a body's bundles run once per iteration) and, over
    the whole kernel, slot use against capacity, from libtpu's final bundle and utilization dumps."""
    import glob

    bundles = [p for p in glob.glob(os.path.join(dump_dir, f"*-{kernel}.*final_bundles.txt"))
               if "schedule-analysis" not in p]
    usage = glob.glob(os.path.join(dump_dir, f"*-{kernel}.*final_hlo-static-per-bundle-utilization.txt"))
    if not bundles or not usage:
        return None
    depths = [len(m.group(1)) for m in map(_BUNDLE.match, open(bundles[0])) if m]
    text = open(usage[0]).read()
    names = [n.strip() for n in text.split("\n")[1].split(",")]
    capacity = [int(v) for v in text.split("\n")[2].split()]
    rows = [[int(v) for v in line.split()] for line in text.split("== UTILIZATION:")[1].strip().splitlines()
            if line.strip() and line.split()[0].isdigit()]
    used = [sum(col) for col in zip(*rows)]
    return {"bundles_by_loop_depth": {d: depths.count(d) for d in sorted(set(depths))},
            "slot_use": {n: round(u / (c * len(rows)), 2) for n, u, c in zip(names, used, capacity) if u}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="v5p:2x2x2", help="a TPU topology, e.g. v5p:2x2x2 or tpu7x:2x2x1")
    ap.add_argument("--mesh", default="tensor=8", help="data=..,expert=..,tensor=.. over the topology's devices")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="k2")
    ap.add_argument("--packing", choices=("tpu", "ct"), default="tpu", help="INT4 expert packing")
    ap.add_argument("--page-order", choices=("lanes", "rows"), default="lanes", help="cache page order")
    ap.add_argument("--schedule", metavar="DIR", help="keep libtpu's dumps here; print the kernels' schedules")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.schedule:  # read when libtpu starts, so before anything compiles
        os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                          f" --xla_jf_dump_to={args.schedule} --xla_jf_dump_llo_text=true")
    r = check(args.target, args.mesh, CONFIGS[args.config], args.packing, args.page_order)
    if args.schedule:
        r["schedule"] = {k: schedule_summary(args.schedule, k) for k in KERNELS}
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{args.config} on {r['target']} ({r['device_kind']}), mesh {r['mesh']}, experts {r['packing']}, "
          f"pages {r['page_order']}")
    moe, att = r["moe"], r["attention"]
    print(f"expert block: temporaries {moe['temp_bytes'] / 1e6:,.1f} MB per device (local expert slab "
          f"{moe['expert_slab_bytes'] / 1e6:,.1f} MB), {len(moe['copies'])} weight-shaped copies, "
          f"compile {moe['compile_seconds']} s")
    for c in moe["copies"]:
        print(f"  {c}")
    print(f"attention: temporaries {att['temp_bytes'] / 1e6:,.1f} MB per device (pool {att['pool_bytes'] / 1e6:,.1f}"
          f" MB), {len(att['copies'])} pool-shaped copies, compile {att['compile_seconds']} s")
    for c in att["copies"]:
        print(f"  {c}")
    pre = r["prefill_attention"]
    runs = "the Mosaic kernel" if "paged_mla_attention_tpu" in pre["kernels"] else "the XLA reference (no kernel)"
    print(f"prefill attention ({CONFIGS[args.config].chunk} tokens): {runs}, temporaries {pre['temp_bytes'] / 1e6:,.1f} "
          f"MB per device, {len(pre['copies'])} pool-shaped copies, compile {pre['compile_seconds']} s")
    for name, sched in r.get("schedule", {}).items():
        if sched:
            print(f"{name}: bundles by loop depth {sched['bundles_by_loop_depth']}; slot use {sched['slot_use']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
