"""One device lease, one command: check every GPU kernel against its reference, then time them for issue 11.

    PYTHONPATH=. python3 scripts/gpu_session.py                    # on the lent GPU, from the repo root
    PYTHONPATH=. python scripts/gpu_session.py --tiny --impl interpret_gpu --out /tmp/s   # CPU rehearsal

Sections, most valuable first; each runs only if its estimate still fits the budget (default 540 s,
inside a 600 s call), and one that fails is recorded and skipped, not fatal:
   1. copy bandwidth (the denominator of every GB/s)
   2. correctness: the INT4 kernels (GEMV, tensor core, default choice) at K2 and ragged shapes, and
      the paged attention kernel (ragged lengths, 64 and 8 heads, one and several splits)
   3. INT4 grouped SwiGLU and down projection at 1, 4, 16, 64, 256 tokens per expert: GB/s, % of
      copy, TFLOP/s, ratio to bf16 ragged_dot; plus GEMV and tensor core forced at 1, 4, 16
   4. paged decode attention at contexts 4K and 64K, batch 1, 8, 32 (4K also through the XLA reference)
   5. one K2 MoE layer (the model's own) at batch 1, 8, 32 against its roofline
   6. a profile of that layer at batch 1: the per-kernel table
   7. tiling variants: GEMV at 1 token, tensor core at 16, attention at 64K batch 1
   8. the whole-step hook: DECODE_HOOK (scripts/bench_decode.py) in a subprocess with the time left
Progress lines print as results land. Under --out (default $OUT): session.md (every table, rewritten
after each section), session.json (every number), profile.md, decode.log and whatever the hook writes.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
import traceback

import bench_attention as attn
import bench_int4 as int4
import jax
import profile_table
from bench_common import Budget, arg_parser, copy_bandwidth, log, markdown

# The whole-step benchmark, run last with the time left; {out} is the output directory. The lead
# adapts scripts/bench_decode.py to the new engine (and its --profile); adjust the flags here.
DECODE_HOOK = "scripts/bench_decode.py --layers 4 --context 4096 --batches 1,8,32 --json {out}/decode.json"


class Session:
    def __init__(self, out: pathlib.Path, budget: Budget):
        self.out, self.budget = out, budget
        self.results: dict = dict(errors=[])
        self.tables: list[str] = []

    def section(self, name: str, needs_s: float, fn):
        """Run fn() if it fits; a failure is logged and recorded, and the session goes on."""
        if not self.budget.allows(name, needs_s):
            self.results.setdefault("skipped", []).append(name)
            return
        log(dict(section=name, left_s=round(self.budget.left())))
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a kernel Triton rejects on this GPU is a finding, not the end of the run
            traceback.print_exc()
            self.results["errors"].append(dict(section=name, error=f"{type(e).__name__}: {e}"[:2000]))
        self.results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        self.save()

    def table(self, title: str, rows: list[dict], columns):
        self.tables.append(f"## {title}\n\n{markdown(rows, columns)}\n")
        print(self.tables[-1], flush=True)

    def save(self):
        (self.out / "session.json").write_text(json.dumps(self.results, indent=1, default=str))
        errors = "".join(f"- {e['section']}: {e['error'].splitlines()[0]}\n" for e in self.results["errors"])
        head = (f"# GPU session {self.results['date']}: {self.results['device']}, jax {jax.__version__}, "
                f"impl {self.results['impl']}\n\ncommand: `{self.results['command']}`\n")
        (self.out / "session.md").write_text(head + "\n" + "\n".join(self.tables)
                                             + (f"\n## errors\n\n{errors}" if errors else ""))


def run(args) -> int:
    shapes, ashapes = (int4.TINY, attn.TINY) if args.tiny else (int4.K2, attn.K2)
    impl, reps = args.impl, args.reps
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Session(out, Budget(args.budget_s))
    dev = jax.devices()[0]
    s.results.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     device=getattr(dev, "device_kind", str(dev)), impl=impl, jax=jax.__version__,
                     command=" ".join(["gpu_session.py", *sys.argv[1:]]), shapes=str(shapes), attn_shapes=str(ashapes))
    log(dict(device=s.results["device"], impl=impl, out=str(out), budget_s=args.budget_s))
    gpu_kernels = int4.is_gpu_kernel(impl)
    state = {}

    def copy_bps():
        if "copy" not in state:
            state["copy"] = copy_bandwidth(shapes.copy_bytes, reps)
            s.results["copy_gbps"] = state["copy"] / 1e9
            s.tables.append(f"copy bandwidth (read + write): {state['copy'] / 1e9:,.0f} GB/s\n")
            log(dict(copy_gbps=state["copy"] / 1e9))
        return state["copy"]

    def banks():
        """A K2 MoE layer, the `active` ones of its INT4 experts, and those as bf16 for ragged_dot."""
        if "bank" not in state:
            state["moe"] = int4.moe_layer(shapes)
            state["bank"] = int4.expert_bank(state["moe"])
            state["active"] = {n: (p[:shapes.active], q[:shapes.active]) for n, (p, q) in state["bank"].items()}
            state["active16"] = int4.bf16_bank(state["active"])
        return state["moe"], state["active"], state["active16"]

    def checks():
        rows = int4.check_kernels(shapes, impl) + attn.check_attention(ashapes, impl)
        s.results["checks"] = rows
        s.table("correctness against the references", rows, [("check", "check", ""), ("rel err", "rel_err", ".2e"),
                                                              ("ok", "ok", "")])

    def grouped():
        _, active, active16 = banks()
        rows = s.results.setdefault("grouped", [])
        for t in shapes.tokens:
            if s.budget.allows(f"grouped t={t}", 10):
                rows += int4.bench_grouped(shapes, impl, active, active16, t, copy_bps(), reps)
        for t in [t for t in shapes.tokens if t <= 16] if gpu_kernels else []:
            for kernel in ("gemv", "mma"):
                if s.budget.allows(f"grouped t={t} {kernel}", 8):
                    rows += int4.bench_grouped(shapes, impl, active, active16, t, copy_bps(), reps, kernel=kernel,
                                               baseline=False)
        s.table("INT4 grouped expert kernels", rows, int4.GROUPED_COLUMNS)

    def attention():
        rows = attn.bench_attention(ashapes, impl, copy_bps(), reps, s.budget)
        s.results["attention"] = rows
        s.table("paged MLA decode attention, one layer", rows, attn.COLUMNS)

    def layer():
        s.results["layer"] = int4.bench_layer(shapes, impl, banks()[0], shapes.batches, copy_bps(), reps)
        s.table("one K2 MoE layer at decode", s.results["layer"], int4.LAYER_COLUMNS)

    def profile():
        import functools

        import jax.numpy as jnp
        from flax import nnx

        graphdef, weights = nnx.split(banks()[0])
        x = jax.random.normal(jax.random.key(9), (1, shapes.hidden), jnp.bfloat16)
        step = functools.partial(int4.layer_step(impl), graphdef)
        table = profile_table.profile(step, (weights, [x]), steps=10)
        text = profile_table.format_table(table)
        (out / "profile.md").write_text(f"# one K2 MoE layer, batch 1, {s.results['device']}\n\n{text}\n")
        s.tables.append(f"## profile: one K2 MoE layer at batch 1\n\n{text}\n")
        print(text, flush=True)

    def variants():
        _, active, active16 = banks()
        rows = s.results.setdefault("variants", [])
        for t, kernel, options in ((1, "gemv", int4.GEMV_VARIANTS), (16, "mma", int4.MMA_VARIANTS)):
            for kw in options[:args.max_variants]:
                if s.budget.allows(f"variant {kernel} {kw}", 8):
                    try:
                        rows += int4.bench_grouped(shapes, impl, active, active16, t, copy_bps(), reps,
                                                   kernel=kernel, overrides=kw, baseline=False)
                    except Exception as e:  # one config Triton rejects must not hide the others
                        log(dict(variant=str(kw), error=f"{type(e).__name__}: {e}"[:300]))
        s.table("INT4 kernel variants", rows, int4.GROUPED_COLUMNS)
        arows = s.results.setdefault("attention_variants", [])
        for kw in attn.VARIANTS[:args.max_variants]:
            try:
                arows += attn.bench_attention(ashapes, impl, copy_bps(), reps, s.budget, [max(ashapes.contexts)],
                                              [1], kw, reference=False)
            except Exception as e:
                log(dict(variant=str(kw), error=f"{type(e).__name__}: {e}"[:300]))
        s.table("attention variants", arows, attn.COLUMNS)

    def decode_hook():
        cmd = [sys.executable] + [a.format(out=out) for a in shlex.split(args.hook)]
        timeout = max(10.0, s.budget.left() - 5)
        log(dict(hook=" ".join(cmd), timeout_s=round(timeout)))
        with open(out / "decode.log", "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                    env={**os.environ, "PYTHONPATH": "."}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        s.results["decode_hook"] = dict(command=" ".join(cmd), returncode=rc)
        log(s.results["decode_hook"])

    sections = [  # (key for --only, name, seconds it needs at least, function, runs with these impls)
        ("copy", "copy bandwidth", 10, copy_bps, True),
        ("checks", "checks", 60, checks, gpu_kernels),
        ("grouped", "grouped INT4 kernels", 40, grouped, True),
        ("attention", "paged attention", 30, attention, True),
        ("layer", "MoE layer", 30, layer, True),
        ("profile", "profile", 20, profile, True),
        ("variants", "variants", 40, variants, gpu_kernels),
        ("hook", "whole-step hook", 120, decode_hook, True),
    ]
    only = set(args.only.split(",")) if args.only else {key for key, *_ in sections}
    unknown = only - {key for key, *_ in sections}
    if unknown:
        raise SystemExit(f"--only: unknown sections {sorted(unknown)}; choose from {[k for k, *_ in sections]}")
    for key, name, needs_s, fn, applies in sections:
        if key in only and applies:
            s.section(name, needs_s, fn)
    s.save()
    failed = [r["check"] for r in s.results.get("checks", []) if not r["ok"]]
    log(dict(done=True, checks_failed=len(failed), errors=len(s.results["errors"])))
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = arg_parser(__doc__, reps_on_gpu=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_session_out"))
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--max-variants", type=int, default=99, help="time at most this many variants of each list")
    ap.add_argument("--hook", default=DECODE_HOOK, help="python arguments of the whole-step benchmark")
    ap.add_argument("--only", help="comma-separated sections: copy,checks,grouped,attention,layer,profile,"
                                   "variants,hook (default: all)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
