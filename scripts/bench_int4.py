"""Check and time the INT4 (W4A16) kernels: GB/s against the measured HBM copy rate, ratio against a bf16
path over pre-dequantized weights, TFLOP/s at large token counts, and one full-size K2 MoE decode layer.

    PYTHONPATH=. python scripts/bench_int4.py [--json out.json] [--sweep] [--skip-check]

On a GPU it first checks every Pallas-GPU kernel against its XLA reference (fresh random data, K2 and
ragged small shapes), then times. On CPU it runs the same program at small sizes through the XLA
path (what `ops` selects there), so the script itself stays testable; CPU figures are not targets.
Needs only jax and numpy (plus this repository's kernels_pallas).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import grouped_moe, ops
from kernels_pallas.int4 import dequantize_int4_ref
from kernels_pallas.int4_matmul import int4_matmul as int4_matmul_kernel
from kernels_pallas.int4_matmul import int4_matmul_ref

GROUP = 32
ON_GPU = jax.default_backend() == "gpu"
# K2 shapes on an accelerator, a toy model on CPU.
HIDDEN, INTER, N_EXP, TOPK = (7168, 2048, 384, 8) if ON_GPU else (512, 256, 32, 8)


def random_int4(key, shape_out_in, dtype=jnp.bfloat16):
    """Random packed weights [..., N, K/8] and scales [..., N, K/32] (any nibble pattern is valid)."""
    *lead, n, k = shape_out_in
    k1, k2 = jax.random.split(key)
    packed = jax.random.bits(k1, (*lead, n, k // 8), jnp.uint32).view(jnp.int32)
    scale = jax.random.uniform(k2, (*lead, n, k // GROUP), jnp.float32, 0.5, 1.5) * (0.02 / 4.6)
    return packed, scale.astype(dtype)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


COMPILE_S = {}  # seconds of the first (compiling) call, per timed function name


def device_time(fn, args, reps: int, budget_s: float = 0.25) -> float:
    """Seconds per call: compile + warm up, then up to `reps` calls (fewer when one call is slow)
    queued back to back and one sync, so host dispatch overlaps device work."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    COMPILE_S[getattr(fn, "__name__", "fn")] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = int(max(2, min(reps, budget_s / max(time.perf_counter() - t0, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


T_START = time.perf_counter()


def log(row):
    """Print each measurement as it lands, so a run cut short still reports what it measured."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    print(f"[{time.perf_counter() - T_START:6.1f}s] " + " ".join(f"{k}={fmt(v)}" for k, v in row.items()),
          flush=True)


def hbm_copy_rate(reps: int) -> float:
    """Bytes/s of a large device-to-device elementwise copy, read + write counted."""
    n = (1 << 30) if ON_GPU else (1 << 24)  # 4 GiB of int32 on GPU
    a = jax.random.bits(jax.random.key(0), (n,), jnp.uint32)
    f = jax.jit(lambda a: a ^ jnp.uint32(1))
    return 2 * a.nbytes / device_time(f, (a,), reps)


def bf16_peak(reps: int) -> float:
    n = 8192 if ON_GPU else 512
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n**3 / device_time(f, (a, b), reps)


# ---------------------------------------------------------------------------------------------
# Correctness on the device: every kernel against its reference.


def check_kernels(results: dict):
    rows = []
    key = jax.random.key(42)
    cases = [  # (name, m, k, n, n_exp, group_sizes or None)
        ("matmul decode", 1, HIDDEN, INTER, None, None),
        ("matmul ragged", 37, 320, 200, None, None),
        ("matmul prefill", 300, HIDDEN, INTER, None, None),
        ("swiglu decode", 8, HIDDEN, INTER, 16, [1, 0, 2, 0, 0, 1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 1]),
        ("swiglu ragged", 100, 320, 200, 6, [7, 0, 40, 1, 33, 0]),
        ("swiglu prefill", 600, HIDDEN, INTER, 4, [300, 0, 170, 120]),
        ("down decode", 8, INTER, HIDDEN, 16, [1, 0, 2, 0, 0, 1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 1]),
        ("down ragged", 100, 320, 200, 6, [7, 0, 40, 1, 33, 0]),
    ]
    for name, m, k, n, n_exp, sizes in cases:
        key, kx, kw1, kw2 = jax.random.split(key, 4)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        if n_exp is None:
            p, s = random_int4(kw1, (n, k))
            got = ops.int4_matmul(x, p, s)
            want = jax.jit(int4_matmul_ref)(x, p, s)
        else:
            gs = jnp.asarray(sizes, jnp.int32)
            p, s = random_int4(kw1, (n_exp, n, k))
            if name.startswith("swiglu"):
                p2, s2 = random_int4(kw2, (n_exp, n, k))
                got = ops.grouped_int4_swiglu(x, p, s, p2, s2, gs)
                want = jax.jit(grouped_moe.grouped_int4_swiglu_ref)(x, p, s, p2, s2, gs)
            else:
                got = ops.grouped_int4_matmul(x, p, s, gs)
                want = jax.jit(grouped_moe.grouped_int4_matmul_ref)(x, p, s, gs)
        err = rel_err(got, want)
        rows.append(dict(kernel=name, m=m, k=k, n=n, rel_err=err, ok=err < 1e-2))
    # Kernel variants the sweep times, checked here so a winner is known to be right.
    sizes = jnp.asarray([1, 0, 2, 0, 0, 1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 1], jnp.int32)
    x = jax.random.normal(key, (8, HIDDEN), jnp.bfloat16)
    (p, s), (p2, s2) = random_int4(kw1, (16, INTER, HIDDEN)), random_int4(kw2, (16, INTER, HIDDEN))
    want = jax.jit(grouped_moe.grouped_int4_swiglu_ref)(x, p, s, p2, s2, sizes)
    for kw in [dict(dequant="bf16"), dict(dequant="join"), dict(split_k=4), dict(block_n=64, block_k=256)]:
        got = grouped_moe.grouped_int4_swiglu(x, p, s, p2, s2, sizes, interpret=not ON_GPU, **kw)
        err = rel_err(got, want)
        rows.append(dict(kernel=f"swiglu decode {kw}", m=8, k=HIDDEN, n=INTER, rel_err=err, ok=err < 1e-2))
    x1 = x[:1]
    want = jax.jit(int4_matmul_ref)(x1, p[0], s[0])
    for kw in [dict(split_k=1), dict(split_k=4, block_n=16)]:
        err = rel_err(int4_matmul_kernel(x1, p[0], s[0], interpret=not ON_GPU, **kw), want)
        rows.append(dict(kernel=f"matmul decode {kw}", m=1, k=HIDDEN, n=INTER, rel_err=err, ok=err < 1e-2))
    p, s = random_int4(key, (3, 200, 320))
    got = ops.dequantize_int4(p, s, 320, jnp.bfloat16)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - dequantize_int4_ref(p, s, 320, jnp.float32)
                                .astype(jnp.bfloat16).astype(jnp.float32))))
    rows.append(dict(kernel="dequant", m=600, k=320, n=0, rel_err=err, ok=err == 0.0))
    results["checks"] = rows
    print("\n| check | M | K | N | rel err | ok |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['m']} | {r['k']} | {r['n']} | {r['rel_err']:.2e} | {r['ok']} |")
    return all(r["ok"] for r in rows)


# ---------------------------------------------------------------------------------------------
# Grouped MoE kernels at t tokens per expert (all E_ACTIVE experts hit, so block sizes see t).


E_ACTIVE = 64 if ON_GPU else 8


def expert_bank(key, n_exp):
    kg, ku, kd = jax.random.split(key, 3)
    return dict(gate=random_int4(kg, (n_exp, INTER, HIDDEN)), up=random_int4(ku, (n_exp, INTER, HIDDEN)),
                down=random_int4(kd, (n_exp, HIDDEN, INTER)))


def bf16_bank(bank):
    """[E, K, N] bf16 copies for ragged_dot, dequantized one projection at a time."""
    out = {}
    for name, (p, s) in bank.items():
        k = p.shape[-1] * 8
        dense = jax.jit(lambda p, s, k=k: jnp.swapaxes(dequantize_int4_ref(p, s, k, jnp.bfloat16), 1, 2))
        out[name] = dense(p, s)
    return out


def bench_grouped(results, bank, bank16, tokens, reps, kernel_kwargs=None, label=None, baseline=True):
    rows = []
    kw = kernel_kwargs or {}
    for t in tokens:
        m = E_ACTIVE * t
        gs = jnp.full((E_ACTIVE,), t, jnp.int32)
        x = jax.random.normal(jax.random.key(t), (m, HIDDEN), jnp.bfloat16)
        h = jax.random.normal(jax.random.key(t + 1), (m, INTER), jnp.bfloat16)
        # Weights travel as arguments: a jitted closure over them would embed gigabytes of
        # constants in the program (that alone once cost 200 s of compile per call site).
        w4_up = (*bank["gate"], *bank["up"])
        w4_down = bank["down"]
        if kw:
            swiglu = jax.jit(lambda x, gs, w: grouped_moe.grouped_int4_swiglu(x, *w, gs, **kw))
            down = jax.jit(lambda h, gs, w: grouped_moe.grouped_int4_matmul(h, *w, gs, **kw))
        else:
            swiglu = jax.jit(lambda x, gs, w: ops.grouped_int4_swiglu(x, *w, gs))
            down = jax.jit(lambda h, gs, w: ops.grouped_int4_matmul(h, *w, gs))

        def swiglu16(x, gs, w):
            g = jax.lax.ragged_dot(x, w[0], gs, preferred_element_type=jnp.float32)
            u = jax.lax.ragged_dot(x, w[1], gs, preferred_element_type=jnp.float32)
            return (jax.nn.silu(g) * u).astype(x.dtype)

        down16 = jax.jit(lambda h, gs, w: jax.lax.ragged_dot(h, w, gs))
        ops_to_time = [("gate+up swiglu", swiglu, jax.jit(swiglu16), x, 2, HIDDEN, INTER, w4_up,
                        (bank16["gate"], bank16["up"])),
                       ("down", down, down16, h, 1, INTER, HIDDEN, w4_down, bank16["down"])]
        for name, f4, f16, inp, n_w, k, n, w4, w16 in ops_to_time:
            t4 = device_time(f4, (inp, gs, w4), reps)
            first_call = COMPILE_S.get("<lambda>", float("nan"))
            t16 = device_time(f16, (inp, gs, w16), reps) if baseline else float("nan")
            w_bytes = E_ACTIVE * n_w * n * (k // 2 + k // GROUP * 2)
            io_bytes = m * k * 2 + m * n * 2
            flops = 2 * m * k * n * n_w
            rows.append(dict(op=name, tokens_per_expert=t, m=m, us=t4 * 1e6, bf16_us=t16 * 1e6,
                             gbps=(w_bytes + io_bytes) / t4 / 1e9, tflops=flops / t4 / 1e12,
                             bf16_tflops=flops / t16 / 1e12, speedup_vs_bf16=t16 / t4,
                             first_call_s=first_call, **(kw or {})))
            log(rows[-1])
    results.setdefault(label or "grouped", []).extend(rows)
    return rows


def bench_dense(results, tokens, reps):
    """int4_matmul on one [INTER, HIDDEN] weight; 16 copies rotate so L2 cannot hold them."""
    copies = 16 if ON_GPU else 2
    keys = jax.random.split(jax.random.key(7), copies)
    ws = [random_int4(k, (INTER, HIDDEN)) for k in keys]
    w16 = [dequantize_int4_ref(p, s, HIDDEN, jnp.bfloat16) for p, s in ws]
    rows = []
    for t in tokens:
        x = jax.random.normal(jax.random.key(t), (t, HIDDEN), jnp.bfloat16)
        f4 = jax.jit(lambda x, ws: [ops.int4_matmul(x, p, s) for p, s in ws])
        f16 = jax.jit(lambda x, ws: [jnp.dot(x, w.T) for w in ws])
        t4 = device_time(f4, (x, ws), reps) / copies
        t16 = device_time(f16, (x, w16), reps) / copies
        w_bytes = INTER * (HIDDEN // 2 + HIDDEN // GROUP * 2)
        rows.append(dict(op="int4_matmul", tokens=t, us=t4 * 1e6, bf16_us=t16 * 1e6,
                         gbps=(w_bytes + t * (HIDDEN + INTER) * 2) / t4 / 1e9,
                         tflops=2 * t * HIDDEN * INTER / t4 / 1e12, speedup_vs_bf16=t16 / t4))
        log(rows[-1])
    results["dense"] = rows
    return rows


# ---------------------------------------------------------------------------------------------
# One K2 MoE layer at decode: router, top-8, sort, grouped INT4 experts, combine, bf16 shared expert.


def moe_layer(x, router, bank, shared):
    t = x.shape[0]
    scores = jax.nn.sigmoid(jnp.dot(x, router, preferred_element_type=jnp.float32))
    w, idx = jax.lax.top_k(scores, TOPK)
    w = w / w.sum(-1, keepdims=True)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    gs = jnp.bincount(flat, length=router.shape[1]).astype(jnp.int32)
    xs = x[order // TOPK]
    (gp, gsc), (up, usc), (dp, dsc) = bank["gate"], bank["up"], bank["down"]
    h = ops.grouped_int4_swiglu(xs, gp, gsc, up, usc, gs)
    ys = ops.grouped_int4_matmul(h, dp, dsc, gs)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, TOPK, -1)
    y = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), w).astype(x.dtype)
    sg, su, sd = shared
    hs = jax.nn.silu(jnp.dot(x, sg)) * jnp.dot(x, su)
    return y + jnp.dot(hs, sd)


def bench_layer(results, bank, batches, reps, hbm):
    key = jax.random.key(3)
    kr, k1, k2, k3 = jax.random.split(key, 4)
    router = jax.random.normal(kr, (HIDDEN, N_EXP), jnp.bfloat16) * 0.02
    shared = (jax.random.normal(k1, (HIDDEN, INTER), jnp.bfloat16) * 0.02,
              jax.random.normal(k2, (HIDDEN, INTER), jnp.bfloat16) * 0.02,
              jax.random.normal(k3, (INTER, HIDDEN), jnp.bfloat16) * 0.02)
    per_expert = sum(p.nbytes + s.nbytes for p, s in bank.values()) / N_EXP
    fixed = sum(a.nbytes for a in shared) + router.nbytes
    calls = 4  # different tokens per call, so different experts: L2 cannot carry weights over
    rows = []
    layer = jax.jit(lambda xs, router, bank, shared: [moe_layer(x, router, bank, shared) for x in xs])
    for b in batches:
        xs = [jax.random.normal(jax.random.key(100 * b + i), (b, HIDDEN), jnp.bfloat16) for i in range(calls)]
        dt = device_time(layer, (xs, router, bank, shared), reps) / calls
        touched = []
        for x in xs:
            idx = jax.lax.top_k(jnp.dot(x, router, preferred_element_type=jnp.float32), TOPK)[1]
            touched.append(len(np.unique(np.asarray(idx))))
        ideal = (np.mean(touched) * per_expert + fixed) / hbm
        rows.append(dict(batch=b, experts_touched=float(np.mean(touched)), us=dt * 1e6,
                         roofline_us=ideal * 1e6, fraction_of_roofline=ideal / dt,
                         first_call_s=COMPILE_S.get("<lambda>", float("nan"))))
        log(rows[-1])
    results["layer"] = rows
    return rows


# ---------------------------------------------------------------------------------------------


# bk=256 first: ptxas (Triton 3.6, sm_90a) gives those 168 registers and no spills, against 255 and
# spills for the bk=512 default; whether that is faster is what this measures.
DECODE_VARIANTS = [dict(block_k=256), dict(block_n=64, block_k=256), dict(dequant="join"),
                   dict(dequant="bf16"), dict(block_n=16, block_k=512)]


def run_variants(results, bank, bank16, reps, deadline):
    """Decode (1 token per expert) timings of GPU kernel variants against the defaults."""
    for kw in DECODE_VARIANTS:
        if time.perf_counter() > deadline:
            break
        try:
            bench_grouped(results, bank, bank16, [1], reps, kw, label="variants", baseline=False)
        except Exception as e:  # a variant Triton rejects is a data point, not a failure
            log(dict(variant=str(kw), error=f"{type(e).__name__}: {e}"[:300]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--variants", action="store_true", help="also time GPU kernel variants at decode")
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="skip the remaining sections after this many seconds (device leases are short)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true",
                    help="only the kernel checks (on CPU: the GPU kernels in interpret mode, small shapes)")
    ap.add_argument("--reps", type=int, default=10 if ON_GPU else 3)
    args = ap.parse_args()
    dev = jax.devices()[0]
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=getattr(dev, "device_kind", str(dev)), platform=jax.default_backend(),
                   jax=jax.__version__, command=" ".join(sys.argv), host=platform.node(),
                   impl=ops.selected_impl(), shapes=dict(hidden=HIDDEN, inter=INTER, experts=N_EXP))
    print(f"# INT4 kernels on {results['device']} ({results['platform']}, impl {results['impl']}), "
          f"jax {jax.__version__}, {results['date']}")
    ok = True
    if args.check_only and not ON_GPU:
        with ops.use_impl("interpret"):
            ok = check_kernels(results)
    elif ON_GPU and not args.skip_check:
        ok = check_kernels(results)
    if args.check_only:
        sys.exit(0 if ok else 1)
    deadline = T_START + args.deadline_s

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    hbm = hbm_copy_rate(args.reps)
    results.update(hbm_copy_gbps=hbm / 1e9)
    log(dict(hbm_copy_gbps=hbm / 1e9))
    bank = expert_bank(jax.random.key(5), N_EXP)
    bits = {name: (p.nbytes + s.nbytes) * 8 / (p.shape[0] * p.shape[1] * p.shape[2] * 8)
            for name, (p, s) in bank.items()}
    results["bits_per_weight"] = bits
    log(dict(bits_per_weight=str(bits)))
    layer = bench_layer(results, bank, [1, 8, 32], args.reps, hbm)
    save()
    active = {name: (p[:E_ACTIVE], s[:E_ACTIVE]) for name, (p, s) in bank.items()}
    active16 = bf16_bank(active)
    grouped = []
    for t in ([1, 4, 16, 64, 256] if ON_GPU else [1, 4, 16]):
        if time.perf_counter() < deadline:
            grouped += bench_grouped(results, active, active16, [t], args.reps)
    save()
    dense = bench_dense(results, [1, 4, 16, 64], args.reps) if time.perf_counter() < deadline else []
    save()
    if ON_GPU and args.variants:
        run_variants(results, active, active16, args.reps, deadline)
        save()
    peak = bf16_peak(args.reps)
    results.update(bf16_matmul_tflops=peak / 1e12)
    save()
    print(f"\nHBM copy: {hbm / 1e9:.0f} GB/s (read+write); bf16 matmul: {peak / 1e12:.0f} TFLOP/s; "
          f"resident bits/weight: " + ", ".join(f"{k} {v:.3f}" for k, v in bits.items()))
    print("\n| op | tok/expert | M | INT4 us | GB/s | % HBM | TFLOP/s | bf16 us | bf16 TFLOP/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in grouped:
        print(f"| {r['op']} | {r['tokens_per_expert']} | {r['m']} | {r['us']:.1f} | {r['gbps']:.0f} | "
              f"{100 * r['gbps'] * 1e9 / hbm:.0f} | {r['tflops']:.1f} | {r['bf16_us']:.1f} | "
              f"{r['bf16_tflops']:.1f} | {r['speedup_vs_bf16']:.2f} |")
    for r in dense:
        print(f"| int4_matmul {INTER}x{HIDDEN} | M={r['tokens']} | {r['tokens']} | {r['us']:.1f} | "
              f"{r['gbps']:.0f} | {100 * r['gbps'] * 1e9 / hbm:.0f} | {r['tflops']:.2f} | "
              f"{r['bf16_us']:.1f} | - | "
              f"{r['speedup_vs_bf16']:.2f} |")
    for r in results.get("variants", []):
        cfg = {k: r[k] for k in ("block_n", "block_k", "num_stages", "dequant") if k in r}
        print(f"| {r['op']} variant {cfg} | {r['tokens_per_expert']} | {r['m']} | {r['us']:.1f} | "
              f"{r['gbps']:.0f} | "
              f"{100 * r['gbps'] * 1e9 / hbm:.0f} | {r['tflops']:.1f} | - | - | - |")
    print("\n| K2 MoE layer decode | experts touched | us | roofline us | % of roofline |")
    print("|---|---|---|---|---|")
    for r in layer:
        print(f"| batch {r['batch']} | {r['experts_touched']:.0f} | {r['us']:.1f} | {r['roofline_us']:.1f} | "
              f"{100 * r['fraction_of_roofline']:.0f} |")
    save()
    if not ok:
        print("KERNEL CHECK FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
