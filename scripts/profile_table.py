"""Per-kernel time table of a jitted step, from a JAX profiler trace.

    table = profile(step, args, steps=10)          # runs step(*args) 10 times under the profiler
    print(format_table(table))

    python scripts/profile_table.py TRACE_DIR --steps 10 [--wall-ms 70.5]   # an existing trace

For each kernel (a device op: a fusion, a custom kernel, a copy): device time per step, calls per
step, and its share of the step's wall time; then the device's busy time per step and the idle
share (wall time minus busy time, over wall time), and the device->host copies per step, which
are host round trips inside the step.

Which trace lines are "the device": on a GPU, the stream lines of the /device:GPU:* processes
(kernels and memcpys); on a TPU, the "XLA Ops" line; on CPU, where there is no device process,
the XLA thunks the CPU client runs (events that name their HLO op). Busy time is the union of
those events' intervals, so concurrent streams are not counted twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

_D2H = re.compile(r"memcpy.*(d2h|dtoh|device ?to ?host)", re.IGNORECASE)


@dataclasses.dataclass
class ProfileTable:
    steps: int
    wall_us: float  # for all steps
    busy_us: float  # union of device intervals, all steps
    kernels: dict[str, tuple[int, float]]  # name -> (calls, device us), all steps
    source: str  # which trace lines were read

    @property
    def idle_share(self) -> float:
        return max(0.0, self.wall_us - self.busy_us) / self.wall_us if self.wall_us else 0.0

    @property
    def d2h_per_step(self) -> float:
        return sum(calls for name, (calls, _) in self.kernels.items() if _D2H.search(name)) / self.steps


def _union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _device_events(events):
    """(events that are device work, description of where they came from)."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in procs.items() if name.startswith("/device:") and "CPU" not in name}
    on_device = [e for e in spans if e["pid"] in devices]
    if on_device:
        line = {id(e): threads.get((e["pid"], e["tid"]), "") for e in on_device}
        for pick, label in ((lambda n: n.startswith("Stream"), "GPU streams"), (lambda n: n == "XLA Ops", "XLA Ops")):
            chosen = [e for e in on_device if pick(line[id(e)])]
            if chosen:
                return chosen, label
        return on_device, "device lines"
    return [e for e in spans if "hlo_op" in (e.get("args") or {})], "CPU thunks"


def find_trace(path) -> pathlib.Path:
    """The newest perfetto_trace.json.gz under `path` (or `path` itself)."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path} (was the trace made with "
                                "create_perfetto_trace=True?)")
    return found[-1]


def parse_trace(path, steps: int, wall_us: float | None = None) -> ProfileTable:
    """Read a perfetto trace (file or profiler output dir). Without `wall_us`, the wall time is the
    span from the first device event's start to the last one's end."""
    with gzip.open(find_trace(path), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    chosen, source = _device_events(events)
    if not chosen:
        raise ValueError(f"no device or XLA events in {path}; nothing ran under the profiler?")
    kernels: dict[str, tuple[int, float]] = {}
    for e in chosen:
        calls, us = kernels.get(e["name"], (0, 0.0))
        kernels[e["name"]] = (calls + 1, us + float(e["dur"]))
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in chosen]
    if wall_us is None:
        wall_us = max(b for _, b in intervals) - min(a for a, _ in intervals)
    return ProfileTable(steps=steps, wall_us=wall_us, busy_us=_union_us(intervals), kernels=kernels, source=source)


def profile(fn, args=(), *, steps: int = 10, trace_dir=None, warmup: int = 1) -> ProfileTable:
    """Run fn(*args) `warmup` times (compile), then `steps` times back to back under the profiler
    with one sync at the end, and tabulate the trace. `trace_dir` keeps the trace."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(trace_dir or tmp)
        with jax.profiler.trace(str(out), create_perfetto_trace=True):
            t0 = time.perf_counter()
            result = None
            for _ in range(steps):
                result = fn(*args)
            jax.block_until_ready(result)
            wall_us = (time.perf_counter() - t0) * 1e6
        return parse_trace(out, steps, wall_us)


def format_table(t: ProfileTable, top: int = 25) -> str:
    """Markdown: the `top` kernels by device time, then the step's totals."""
    step_us = t.wall_us / t.steps
    rows = sorted(t.kernels.items(), key=lambda kv: -kv[1][1])
    lines = [f"| kernel ({t.source}) | us/step | calls/step | % of step |", "|---|---|---|---|"]
    for name, (calls, us) in rows[:top]:
        lines.append(f"| {name[:80]} | {us / t.steps:.1f} | {calls / t.steps:.2f} | {100 * us / t.wall_us:.1f} |")
    if len(rows) > top:
        rest = sum(us for _, (_, us) in rows[top:])
        lines.append(f"| ({len(rows) - top} more) | {rest / t.steps:.1f} | - | {100 * rest / t.wall_us:.1f} |")
    lines.append(f"\nwall {step_us:.1f} us/step, device busy {t.busy_us / t.steps:.1f} us/step, "
                 f"device idle {100 * t.idle_share:.1f} %, device->host copies {t.d2h_per_step:.1f}/step "
                 f"({t.steps} steps)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="a profiler output directory or a perfetto_trace.json.gz")
    ap.add_argument("--steps", type=int, required=True, help="steps the trace holds")
    ap.add_argument("--wall-ms", type=float, help="wall time of those steps (default: span of device events)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    wall = None if args.wall_ms is None else args.wall_ms * 1e3
    print(format_table(parse_trace(args.trace, args.steps, wall), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
