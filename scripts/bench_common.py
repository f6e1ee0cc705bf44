"""Helpers the kernel benchmarks share: timing, copy bandwidth, progress lines, markdown tables and a
time budget. Needs only jax and numpy (random INT4 weights are kimi_jax.quant.random_int4).

Scripts import it as a sibling (`python scripts/x.py` puts scripts/ first on sys.path).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

T_START = time.perf_counter()


def arg_parser(doc: str, reps_on_gpu: int) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes: --impl, --reps, --tiny."""
    from kernels_pallas import ops
    from kernels_pallas.backends import backend_for

    on_gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default=backend_for(jax.default_backend()).impl, choices=ops.IMPLS,
                    help="kernel implementation (default: the one for this platform)")
    ap.add_argument("--reps", type=int, default=reps_on_gpu if on_gpu else 3, help="timed calls per measurement")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    return ap


def log(row: dict):
    """Print a measurement as it lands (seconds since start first), so a run cut short still reports."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    print(f"[{time.perf_counter() - T_START:6.1f}s] " + " ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)


def device_time(fn, args, reps: int, budget_s: float = 0.25) -> tuple[float, float]:
    """(seconds per call, seconds of the first call). The first call compiles; then up to `reps`
    calls (fewer when one is slow) are queued back to back with one sync, so host dispatch
    overlaps device work. Weights must be arguments: a jitted closure over them would embed them
    as constants (gigabytes of program, minutes of compile)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = int(max(2, min(reps, budget_s / max(time.perf_counter() - t0, 1e-9))))
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps, first


def copy_bandwidth(nbytes: int, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device elementwise copy, read + write counted."""
    a = jax.random.bits(jax.random.key(0), (nbytes // 4,), jnp.uint32)
    per_call, _ = device_time(jax.jit(lambda a: a ^ jnp.uint32(1)), (a,), reps)
    return 2 * a.nbytes / per_call


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64; inf when a holds a NaN or inf."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (header, key, format spec); missing values print as '-'."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "-" for _, k, f in columns]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


class Budget:
    """Wall-clock budget for a run that must finish inside a device lease."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, section: str, needs_s: float) -> bool:
        """Whether `section` (estimated at needs_s seconds) still fits; says so when it does not."""
        if self.left() >= needs_s:
            return True
        log(dict(skipped=section, needs_s=needs_s, left_s=round(self.left(), 1)))
        return False
