"""Host cost of the decode loop: K2's 61-layer structure at tiny width through the engine, against
the device time of the same compiled step.

For each batch (slots, all decoding) and each set of decode block lengths, it reports
  engine   — wall time per decode step through `BatchEngine.generate` (scheduler, uploads,
             dispatch, reading tokens), from each request's first token to its last;
  device   — the same compiled program dispatched back to back with its inputs ready (nothing
             read in between), per step;
  overhead — engine minus device, per step and per dispatch.
The model is small enough that the host, not the arithmetic, decides the first figure: what is
measured is what a GPU would wait for between steps. Also reported: what entering the engine's
mesh context costs per dispatch (`jax.set_mesh`, a sharded engine pays it around each call).

    PYTHONPATH=. python scripts/bench_host.py                  # 61 layers, batches 1 and 32
    PYTHONPATH=. python scripts/bench_host.py --layers 4 --tokens 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import TINY
from kimi_jax.engine import BatchEngine
from kimi_jax.model import KimiK2
from kimi_jax.sampling import SamplingParams
from kimi_jax.scheduler import DEFAULT_DECODE_BLOCK, DecodeWork
from kimi_jax.steps import SlotState


def engine_ms_per_step(engine: BatchEngine, requests: int, tokens: int) -> float:
    """Median over `requests` requests run together of (last token time - first token time) / steps
    between them."""
    prompts = [[1 + i, 2, 3, 4] for i in range(requests)]
    done = engine.generate(prompts, SamplingParams(max_new_tokens=tokens + 1))
    return 1e3 * float(np.median([(r.finished_at - r.first_token_at) / (len(r.tokens) - 1) for r in done]))


def device_ms_per_step(engine: BatchEngine, batch: int, steps: int, reps: int) -> float:
    """The engine's decode program for `steps` steps and all slots, dispatched `reps` times back to
    back through the engine's device with every row generating; per step."""
    dev = engine.device
    per_seq = engine.scheduler.table.shape[1]
    table = (1 + np.arange(batch * per_seq, dtype=np.int32) % (engine.pool.n_pages - 1)).reshape(batch, per_seq)
    dev.set_table(table)
    dev.state = SlotState(tokens=jnp.ones(batch, jnp.int32), alive=jnp.ones(batch, bool),
                          budget=jnp.full(batch, 1 << 30, jnp.int32))
    work = DecodeWork(rows=np.arange(batch, dtype=np.int32), steps=steps, mask=None, requests=[])
    jax.block_until_ready(dev.decode(work))  # compiled already; this settles the inputs
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = dev.decode(work)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t0) / (reps * steps)


def idle_slot_ratio(model, slots: int, tokens: int) -> dict:
    """One request alone in a 1-slot engine and in a `slots`-slot engine: ms per decode step of
    each (the second must not pay for its idle slots)."""
    out = {}
    for n in (1, slots):
        engine = BatchEngine(model, max_batch=n, max_len=2 * tokens + 64, chunk=16)
        engine_ms_per_step(engine, 1, DEFAULT_DECODE_BLOCK + 2)  # compiles
        out[n] = engine_ms_per_step(engine, 1, tokens)
    return {"slots": slots, "alone_ms": round(out[1], 2), "one_of_many_ms": round(out[slots], 2),
            "ratio": round(out[slots] / out[1], 3)}


def mesh_context_us(reps: int = 2000) -> float:
    """Microseconds to enter and leave `jax.set_mesh` of a mesh over every local device."""
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    t0 = time.perf_counter()
    for _ in range(reps):
        with jax.set_mesh(mesh):
            pass
    return 1e6 * (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per request")
    ap.add_argument("--checkpoint", help="instead: one request alone in a 1-slot and in a 32-slot engine of this "
                                         "checkpoint (e.g. a K2-shaped INT4 slice), ms per decode step")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.checkpoint:
        import kimi_jax

        row = idle_slot_ratio(kimi_jax.load(args.checkpoint, dtype="bfloat16"), 32, args.tokens)
        print(json.dumps(row))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f)
        return 0
    cfg = TINY.replace(num_hidden_layers=args.layers, first_k_dense_replace=1)
    model = KimiK2(cfg, dtype=jnp.float32)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for n in (1, DEFAULT_DECODE_BLOCK):
            engine = BatchEngine(model, max_batch=batch, max_len=2 * args.tokens + 512, chunk=16,
                                 prefill_rows=batch, decode_block=n)
            t0 = time.perf_counter()
            engine_ms_per_step(engine, batch, n + 2)  # compiles prefill and the decode program
            compile_s = time.perf_counter() - t0
            wall = engine_ms_per_step(engine, batch, args.tokens)
            device = device_ms_per_step(engine, batch, n, reps=max(2, args.tokens // n))
            row = dict(layers=args.layers, batch=batch, steps_per_dispatch=n, engine_ms_per_step=round(wall, 3),
                       device_ms_per_step=round(device, 3), overhead_ms_per_step=round(wall - device, 3),
                       overhead_ms_per_dispatch=round((wall - device) * n, 3), warmup_s=round(compile_s, 1))
            print(json.dumps(row), flush=True)
            rows.append(row)
    ctx = mesh_context_us()
    print(json.dumps({"set_mesh_us_per_dispatch": round(ctx, 1), "devices": len(jax.devices())}))
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{args.layers} layers, {args.tokens} steps timed")
    print("| batch | steps/dispatch | engine ms/step | device ms/step | overhead ms/step | overhead ms/dispatch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['steps_per_dispatch']} | {r['engine_ms_per_step']:.2f} | "
              f"{r['device_ms_per_step']:.2f} | {r['overhead_ms_per_step']:.3f} | {r['overhead_ms_per_dispatch']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "set_mesh_us": ctx}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
