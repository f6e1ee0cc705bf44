"""Check and time the INT4 (W4A16) routed-expert kernels: GB/s against the measured copy bandwidth,
ratio against bf16 `ragged_dot` over pre-dequantized weights, TFLOP/s at large token counts, and one
K2 MoE layer at decode (the model's own `kimi_jax.moe.MoE`, weights as arguments).

    PYTHONPATH=. python scripts/bench_int4.py [--impl pallas_gpu] [--variants] [--json out.json]
    PYTHONPATH=. python scripts/bench_int4.py --check-only        # CPU: the GPU kernels interpreted

With a GPU kernel implementation it first checks every GPU kernel (both families, GEMV and tensor
core, forced, plus the default choice) against its XLA reference at K2 and ragged small shapes,
then times. On CPU the same program runs at small sizes through `impl` ("xla" by default), so the
script stays testable; CPU figures are not targets. scripts/gpu_session.py runs these sections
inside one device lease.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Budget, arg_parser, copy_bandwidth, device_time, log, markdown, rel_err
from flax import nnx

from kernels_pallas import experts_gpu, ops
from kernels_pallas.experts_xla import grouped_int4_matmul_ref, grouped_int4_swiglu_ref
from kernels_pallas.int4_ct import dequantize_int4_ref
from kimi_jax.config import K2_THINKING, Int4Quant
from kimi_jax.moe import MoE, route
from kimi_jax.quant import random_int4

GROUP = 32


@dataclasses.dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    n_exp: int  # routed experts of a layer
    topk: int
    active: int  # experts that get rows in the grouped timings
    tokens: tuple[int, ...]  # tokens per expert to time
    copy_bytes: int  # size of the copy-bandwidth probe
    batches: tuple[int, ...] = (1, 8, 32)  # decode batches of the MoE layer timings


K2 = Shapes(7168, 2048, 384, 8, 64, (1, 4, 16, 64, 256), 4 << 30)
SMALL = Shapes(512, 256, 32, 8, 8, (1, 4, 16), 64 << 20)  # CPU runs
TINY = Shapes(128, 64, 8, 2, 4, (1, 4), 1 << 20, batches=(1, 8))  # smoke tests

# At 1 token per expert the default grid is 8 experts x N/32 programs (512 at batch 1), light ones:
# more K splits buy more bytes in flight per SM; the rest probe tile shape, warps and pipelining.
GEMV_VARIANTS = [dict(split_k=2), dict(split_k=4), dict(x_planes=False), dict(block_n=16), dict(block_n=64),
                 dict(block_groups=8), dict(block_groups=32), dict(num_warps=8), dict(num_stages=4),
                 dict(block_m=2)]
MMA_VARIANTS = [dict(block_k=256), dict(block_n=64, block_k=256), dict(dequant="bf16"), dict(dequant="join")]


def int4_arrays(key, shape_out_in):
    """Random (packed, scale) of logical shape [..., out, in], the spread of a trained layer."""
    w = random_int4(key, shape_out_in, GROUP)
    return w.packed, w.scale


def is_gpu_kernel(impl: str) -> bool:
    return impl in ("pallas_gpu", "interpret_gpu")


def grouped_fns(impl, kernel=None, overrides=None):
    """(swiglu, down) jitted with weights as arguments; a kernel family or overrides force the GPU kernels."""
    if kernel or overrides:
        if not is_gpu_kernel(impl):
            raise ValueError(f"kernel families and overrides are GPU-kernel settings; impl is {impl!r}")
        kw = dict(kernel=kernel, interpret=impl == "interpret_gpu", **(overrides or {}))
        return (jax.jit(lambda x, gs, w: experts_gpu.grouped_int4_swiglu_gpu(x, *w, gs, **kw)),
                jax.jit(lambda h, gs, w: experts_gpu.grouped_int4_matmul_gpu(h, *w, gs, **kw)))
    return (jax.jit(lambda x, gs, w: ops.grouped_int4_swiglu(x, *w, gs, impl=impl)),
            jax.jit(lambda h, gs, w: ops.grouped_int4_matmul(h, *w, gs, impl=impl)))


# ---------------------------------------------------------------------------------------------
# Correctness on the device: every GPU kernel against its reference.


def check_kernels(shapes: Shapes, impl: str) -> list[dict]:
    """Relative error of each GPU kernel (GEMV, tensor core, default choice) against the reference."""
    hid, inter = shapes.hidden, shapes.inter
    decode16 = [1, 0, 2, 0, 0, 1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 1]  # 8 rows over 16 experts
    cases = [  # (op, m, k, n, group sizes)
        ("swiglu", 8, hid, inter, decode16), ("swiglu", 100, 320, 200, [7, 0, 40, 1, 33, 0]),
        ("swiglu", 600, hid, inter, [300, 0, 170, 120]),
        ("down", 8, inter, hid, decode16), ("down", 100, 320, 200, [7, 0, 40, 1, 33, 0]),
    ]
    interpret = impl == "interpret_gpu"
    key, rows = jax.random.key(42), []
    for op, m, k, n, sizes in cases:
        key, kx, kw1, kw2 = jax.random.split(key, 4)
        x = jax.random.normal(kx, (m + 2, k), jnp.bfloat16)  # 2 padding rows past the groups
        gs = jnp.asarray(sizes, jnp.int32)
        w = [int4_arrays(kw1, (len(sizes), n, k))] + ([int4_arrays(kw2, (len(sizes), n, k))] if op == "swiglu" else [])
        flat = [a for pair in w for a in pair]
        if op == "swiglu":
            want = jax.jit(grouped_int4_swiglu_ref)(x, *flat, gs)
            run = lambda kernel, x=x, f=flat, gs=gs: experts_gpu.grouped_int4_swiglu_gpu(
                x, *f, gs, kernel=kernel, interpret=interpret)
        else:
            want = jax.jit(grouped_int4_matmul_ref)(x, *flat, gs)
            run = lambda kernel, x=x, f=flat, gs=gs: experts_gpu.grouped_int4_matmul_gpu(
                x, *f, gs, kernel=kernel, interpret=interpret)
        for kernel in (None, "gemv", "mma"):
            row = dict(check=f"{op} {kernel or 'default'}", m=m, k=k, n=n)
            try:
                got = run(kernel)
                row.update(rel_err=rel_err(got, want))
                pad_ok = bool(jnp.all(got[sum(sizes):] == 0))
                row.update(ok=row["rel_err"] < 1e-2 and pad_ok)
            except Exception as e:  # e.g. a config this GPU's Triton rejects: a failed check, not the end
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            log(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Timings


def moe_layer(shapes: Shapes, seed: int = 5) -> MoE:
    """One K2 MoE layer of these shapes as the model builds it: router, INT4 routed experts in the
    checkpoint's packing, bf16 shared expert, random weights."""
    cfg = K2_THINKING.replace(hidden_size=shapes.hidden, moe_intermediate_size=shapes.inter,
                              n_routed_experts=shapes.n_exp, num_experts_per_tok=shapes.topk,
                              quantization=Int4Quant(group_size=GROUP))
    return MoE(cfg, jnp.bfloat16, nnx.Rngs(params=seed))


def expert_bank(moe: MoE) -> dict:
    """The layer's routed experts as {projection: (packed, scale)}, for the grouped-kernel timings."""
    weights = {"gate": moe.gate_proj, "up": moe.up_proj, "down": moe.down_proj}
    return {name: (var.get_value().packed, var.get_value().scale) for name, var in weights.items()}


def layer_step(impl: str):
    """step(graphdef, state, xs): the MoE layer on each batch of `xs`, jitted with the weights as
    arguments (a jitted closure over them would embed them as constants)."""
    return jax.jit(lambda graphdef, state, xs: [nnx.merge(graphdef, state)(x, impl) for x in xs], static_argnums=0)


def bf16_bank(bank):
    """[E, K, N] bf16 copies for ragged_dot, dequantized one projection at a time."""
    out = {}
    for name, (p, s) in bank.items():
        k = p.shape[-1] * 8
        out[name] = jax.jit(lambda p, s, k=k: jnp.swapaxes(dequantize_int4_ref(p, s, k, jnp.bfloat16), 1, 2))(p, s)
    return out


def _swiglu16(x, gs, w):
    g = jax.lax.ragged_dot(x, w[0], gs, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(x, w[1], gs, preferred_element_type=jnp.float32)
    return (jax.nn.silu(g) * u).astype(x.dtype)


_BF16 = (jax.jit(_swiglu16), jax.jit(lambda h, gs, w: jax.lax.ragged_dot(h, w, gs)))


def bench_grouped(shapes, impl, bank, bank16, t, copy_bps, reps, kernel=None, overrides=None, baseline=True):
    """SwiGLU and down projection at t tokens per expert over `shapes.active` experts."""
    e, rows = shapes.active, []
    m = e * t
    gs = jnp.full((e,), t, jnp.int32)
    x = jax.random.normal(jax.random.key(t), (m, shapes.hidden), jnp.bfloat16)
    h = jax.random.normal(jax.random.key(t + 1), (m, shapes.inter), jnp.bfloat16)
    swiglu, down = grouped_fns(impl, kernel, overrides)
    cases = [("gate+up swiglu", swiglu, _BF16[0], x, (*bank["gate"], *bank["up"]), (bank16["gate"], bank16["up"]),
              2, shapes.hidden, shapes.inter),
             ("down", down, _BF16[1], h, bank["down"], bank16["down"], 1, shapes.inter, shapes.hidden)]
    for op, f4, f16, inp, w4, w16, n_w, k, n in cases:
        t4, first = device_time(f4, (inp, gs, w4), reps)
        t16 = device_time(f16, (inp, gs, w16), reps)[0] if baseline else None
        w_bytes = e * n_w * n * (k // 2 + k // GROUP * 2)
        gbps = (w_bytes + m * (k + n) * 2) / t4 / 1e9
        flops = 2 * m * k * n * n_w
        rows.append(dict(op=op, tokens_per_expert=t, m=m, kernel=kernel or "default", config=str(overrides or ""),
                         us=t4 * 1e6, gbps=gbps, pct_copy=100 * gbps * 1e9 / copy_bps, tflops=flops / t4 / 1e12,
                         bf16_us=None if t16 is None else t16 * 1e6,
                         speedup_vs_bf16=None if t16 is None else t16 / t4, first_call_s=first))
        log(rows[-1])
    return rows


def bench_layer(shapes, impl, moe: MoE, batches, copy_bps, reps):
    """The layer at each decode batch, against its roofline: the bytes of the experts the batch
    touches, the shared expert and the router, read once at the copy bandwidth."""
    graphdef, state = nnx.split(moe)
    experts = sum(p.nbytes + s.nbytes for p, s in expert_bank(moe).values())
    per_expert = experts / shapes.n_exp
    fixed = sum(x.nbytes for x in jax.tree.leaves(state)) - experts
    calls = 4  # different tokens per call, so different experts: L2 cannot carry weights over
    step = functools.partial(layer_step(impl), graphdef)
    router, bias = moe.router[...], moe.router_bias[...]
    rows = []
    for b in batches:
        xs = [jax.random.normal(jax.random.key(100 * b + i), (b, shapes.hidden), jnp.bfloat16) for i in range(calls)]
        dt, first = device_time(step, (state, xs), reps)
        dt /= calls
        touched = np.mean([len(np.unique(np.asarray(route(x, router, bias, moe.cfg)[1]))) for x in xs])
        ideal = (touched * per_expert + fixed) / copy_bps
        rows.append(dict(batch=b, experts_touched=float(touched), us=dt * 1e6, roofline_us=ideal * 1e6,
                         pct_roofline=100 * ideal / dt, first_call_s=first))
        log(rows[-1])
    return rows


GROUPED_COLUMNS = [("op", "op", ""), ("tok/expert", "tokens_per_expert", "d"), ("M", "m", "d"),
                   ("kernel", "kernel", ""), ("config", "config", ""), ("INT4 us", "us", ".1f"),
                   ("GB/s", "gbps", ".0f"), ("% copy", "pct_copy", ".0f"), ("TFLOP/s", "tflops", ".2f"),
                   ("bf16 us", "bf16_us", ".1f"), ("x bf16", "speedup_vs_bf16", ".2f")]
LAYER_COLUMNS = [("batch", "batch", "d"), ("experts touched", "experts_touched", ".0f"), ("us", "us", ".1f"),
                 ("roofline us", "roofline_us", ".1f"), ("% roofline", "pct_roofline", ".0f")]
CHECK_COLUMNS = [("check", "check", ""), ("M", "m", "d"), ("K", "k", "d"), ("N", "n", "d"),
                 ("rel err", "rel_err", ".2e"), ("ok", "ok", "")]


def main(argv=None) -> int:
    on_gpu = jax.default_backend() == "gpu"
    ap = arg_parser(__doc__, reps_on_gpu=10)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--variants", action="store_true", help="also time GPU kernel variants at 1 and 16 tokens")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip sections that no longer fit")
    ap.add_argument("--check-only", action="store_true",
                    help="only the kernel checks (on CPU: the GPU kernels interpreted, small shapes)")
    args = ap.parse_args(argv)
    shapes = TINY if args.tiny else K2 if on_gpu else SMALL
    budget = Budget(args.budget_s)
    dev = jax.devices()[0]
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__, impl=args.impl,
                   command="bench_int4.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   shapes=dataclasses.asdict(shapes))
    print(f"# INT4 kernels on {results['device']}, impl {args.impl}, jax {jax.__version__}, {results['date']}")
    ok = True
    check_impl = args.impl if is_gpu_kernel(args.impl) else ("interpret_gpu" if args.check_only else None)
    if check_impl:
        results["checks"] = check_kernels(shapes, check_impl)
        ok = all(r["ok"] for r in results["checks"])
        print(markdown(results["checks"], CHECK_COLUMNS))
    if args.check_only:
        return 0 if ok else 1
    copy_bps = copy_bandwidth(shapes.copy_bytes, args.reps)
    results["copy_gbps"] = copy_bps / 1e9
    log(dict(copy_gbps=copy_bps / 1e9))
    moe = moe_layer(shapes)
    bank = expert_bank(moe)
    results["layer"] = bench_layer(shapes, args.impl, moe, shapes.batches, copy_bps, args.reps)
    active = {name: (p[:shapes.active], s[:shapes.active]) for name, (p, s) in bank.items()}
    active16 = bf16_bank(active)
    results["grouped"] = []
    for t in shapes.tokens:
        if budget.allows(f"grouped t={t}", 5):
            results["grouped"] += bench_grouped(shapes, args.impl, active, active16, t, copy_bps, args.reps)
    if args.variants and is_gpu_kernel(args.impl):
        results["variants"] = []
        for t, kernel, variants in ((1, "gemv", GEMV_VARIANTS), (16, "mma", MMA_VARIANTS)):
            for kw in variants:
                if budget.allows(f"variant {kw}", 5):
                    results["variants"] += bench_grouped(shapes, args.impl, active, active16, t, copy_bps,
                                                         args.reps, kernel, kw, baseline=False)
    print(f"\ncopy {copy_bps / 1e9:.0f} GB/s (read+write)\n")
    print(markdown(results["grouped"] + results.get("variants", []), GROUPED_COLUMNS))
    print("\nK2 MoE layer at decode\n" + markdown(results["layer"], LAYER_COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not ok:
        print("KERNEL CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
