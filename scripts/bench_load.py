"""Checkpoint load time against the floor this machine allows, and the host memory the load takes.

    PYTHONPATH=. python scripts/bench_load.py --quick                     # tiny fixture, seconds
    PYTHONPATH=. python scripts/bench_load.py                             # writes the 6 GB K2-shaped
                                                                         # slice to a temporary dir
    PYTHONPATH=. python scripts/bench_load.py --checkpoint DIR --orbax   # an existing directory

Without --checkpoint a fixture is written first: by default the K2-shaped slice of issue 11
(`--preset k2-thinking --int4 --group-size 32 --layers 2 --experts 16`: 6.4 GB, which needs that
much free disk and twice that in free memory), or what the config flags say.

A CPU load of N bytes must read them (from the page cache: it cannot be dropped here, so the files
are read once first) and write them into memory nobody has touched yet. Two references measure
those costs on this machine, in the same run:
  (a) cat: `cat FILES > /dev/null`, which reads everything and writes into one small reused buffer;
  (b) fresh write: a fresh process allocating one buffer per file and filling it, on whichever page
      size is cheaper at the time: 2 MiB huge pages (`np.empty(n, uint8).fill(1)`: numpy asks Linux
      for transparent huge pages on arrays of 4 MiB and more) or 4 KiB pages faulted in up front
      (an mmap with MAP_POPULATE); both are timed, and the cheaper one is the reference. On our VM
      either can be 3x the other, depending on the host (kimi_jax/checkpoint/host_memory.py, which
      makes the loader choose the same way).
The floor is max(cat, fresh write), and the target is a load within 1.5x of it: (c) `load_model`
(bf16, CPU), each run in a fresh process so that its peak RSS is its own. "Beyond weights" is the
peak RSS of that process minus its RSS before loading minus the bytes of the loaded parameters: on
CPU the device memory is host memory, so this is the memory the loader needed on top of the model;
the target is at most twice the largest tensor. The three alternate (cat, fresh write, load, cat,
...) so that drifting machine load hits all of them, `--repeat` times (default 3); medians are
reported. With --orbax the checkpoint is also converted (`kimi_jax.convert`) and `load_converted`'s
restore is timed against the same references. Prints a summary, then one markdown row per
measurement for BENCHMARKS.md (or JSON with --json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.5  # load within 1.5x max(cat, fresh write)
TARGET_BEYOND = 2.0  # peak host memory beyond the weights within 2x the largest tensor


def checkpoint_files(directory) -> list[str]:
    return sorted(str(p) for p in pathlib.Path(directory).rglob("*") if p.is_file())


def cat_seconds(files: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def largest_tensor_bytes(directory) -> int:
    from kimi_jax.checkpoint import CheckpointReader

    with CheckpointReader(directory) as reader:
        return max(info.nbytes for f in reader.files.values() for info in f.tensors.values())


def child(kind: str, directory: str) -> dict:
    """Run `kind` ('hf' or 'orbax' load, 'fresh:huge' or 'fresh:small') on `directory` in a fresh
    process: its result."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, directory], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} load of {directory} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far: on a shared machine, what a measurement
    cost itself, whatever else was running."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(kind: str, directory: str) -> None:
    if kind.startswith("fresh:"):
        import mmap

        import numpy as np

        sizes = [os.path.getsize(f) for f in checkpoint_files(directory) if f.endswith(".safetensors")]
        t0, c0 = time.perf_counter(), cpu_seconds()
        buffers = []
        for n in sizes:
            if kind == "fresh:huge":
                buffers.append(np.empty(n, np.uint8))
            else:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
                buffers.append(np.frombuffer(mmap.mmap(-1, n, flags=flags), np.uint8))
            buffers[-1].fill(1)
        print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0}))
        return
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.checkpoint import load_model
    from kimi_jax.config import Config
    from kimi_jax.convert import load_converted

    jax.devices()  # start the backend (and import the loader) before the baseline: neither is loading
    baseline = rss_bytes("VmRSS")
    t0, c0 = time.perf_counter(), cpu_seconds()
    if kind == "hf":
        model, _ = load_model(directory, dtype=jnp.bfloat16, progress=False)
    else:
        model = load_converted(directory, Config.from_hf(directory), dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    weights = sum(x.nbytes for x in leaves)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds() - c0, "weights": weights,
                      "baseline_rss": baseline, "peak_rss": rss_bytes("VmHWM")}))


def measure(kind: str, directory: str, repeat: int, hf_directory: str) -> dict:
    """cat, fresh write and load of `directory`, alternating, `repeat` times each; the medians."""
    files = checkpoint_files(directory)
    cat_seconds(files)  # warm the page cache
    runs = {"cat_s": [], "fresh_huge_s": [], "fresh_small_s": [], "load_s": []}
    cpu = {"fresh_huge_cpu_s": [], "fresh_small_cpu_s": [], "load_cpu_s": []}  # CPU seconds, for noisy machines
    loads = []
    for _ in range(repeat):
        runs["cat_s"].append(cat_seconds(files))
        for pages in ("huge", "small"):
            r = child(f"fresh:{pages}", hf_directory)
            runs[f"fresh_{pages}_s"].append(r["seconds"])
            cpu[f"fresh_{pages}_cpu_s"].append(r["cpu_seconds"])
        loads.append(child(kind, directory))
        runs["load_s"].append(loads[-1]["seconds"])
        cpu["load_cpu_s"].append(loads[-1]["cpu_seconds"])
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"kind": kind, "files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
            "cat_s": medians["cat_s"], "fresh_s": min(medians["fresh_huge_s"], medians["fresh_small_s"]),
            "fresh_pages": "huge" if medians["fresh_huge_s"] <= medians["fresh_small_s"] else "small",
            "load_s": medians["load_s"], "weights": loads[0]["weights"],
            "beyond": max(r["peak_rss"] - r["baseline_rss"] - r["weights"] for r in loads), "runs": runs,
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def floor_seconds(r: dict) -> float:
    """What the machine needs at least to produce the loaded bytes: read them, write fresh memory."""
    return max(r["cat_s"], r["fresh_s"])


def machine() -> str:
    from bench_cpu import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores"


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000


def row(r: dict, largest: int, command: str) -> str:
    ratio = r["load_s"] / floor_seconds(r)
    beyond = r["beyond"] / largest
    met = ["met" if ok else "not met" for ok in (ratio <= TARGET_RATIO, beyond <= TARGET_BEYOND)]
    what = "load_model (bf16)" if r["kind"] == "hf" else "orbax restore (bf16)"
    return (f"| {datetime.date.today()} | {machine()} | `{command}` | {what} | {size(r['bytes'])} in "
            f"{r['files']} files, largest tensor {size(largest)} | {r['cat_s']:.2f} s | "
            f"{r['fresh_s']:.2f} s ({r.get('fresh_pages', '?')} pages) | "
            f"{r['load_s']:.2f} s ({size(r['bytes'] / r['load_s'])}/s) | {ratio:.2f}× ({met[0]}) | "
            f"{size(max(r['beyond'], 0))}, {beyond:.2f}× largest ({met[1]}) |")


HEADER = ("| date | machine | command | load | files | cat (page cache) | fresh write (cheaper pages) | load | "
          "load ÷ max(cat, fresh write) (target ≤ 1.5×) | peak RSS beyond weights (target ≤ 2× largest tensor) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    from make_fixture_checkpoint import add_config_args, fixture_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="an existing HF checkpoint directory (else a fixture is written)")
    ap.add_argument("--out", help="where to write the fixture (default: a temporary directory, removed after)")
    add_config_args(ap)
    ap.add_argument("--quick", action="store_true", help="a tiny fixture: the whole run takes seconds")
    ap.add_argument("--orbax", action="store_true", help="also convert to orbax and time its restore")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the median is reported")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.set_defaults(preset="k2-thinking", int4=True, group_size=32, layers=2, experts=16)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(*args.child)
        return 0
    if args.quick and args.checkpoint:
        ap.error("--quick writes its own tiny fixture; it takes no --checkpoint")

    from kimi_jax.config import TINY, Int4Quant
    from kimi_jax.fixtures import make_fixture_checkpoint, with_fixture_token_ids

    cfg = with_fixture_token_ids(TINY.replace(quantization=Int4Quant(group_size=16))) if args.quick \
        else fixture_config(args)

    scratch = tempfile.mkdtemp(prefix="bench_load_")
    try:
        directory = args.checkpoint
        if directory is None:
            directory = args.out or os.path.join(scratch, "hf")
            t0 = time.perf_counter()
            make_fixture_checkpoint(directory, cfg, tokenizer=False)
            print(f"wrote the fixture in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        largest = largest_tensor_bytes(directory)
        results = [measure("hf", directory, args.repeat, directory)]
        if args.orbax:
            from kimi_jax.convert import convert

            converted = os.path.join(scratch, "orbax")
            t0 = time.perf_counter()
            convert(directory, converted, progress=False)
            print(f"converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            results.append(measure("orbax", converted, args.repeat, directory))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "python scripts/bench_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps({"largest_tensor": largest, "results": results}, indent=2))
        return 0
    for r in results:
        print(f"{r['kind']}: {size(r['bytes'])} in {r['files']} files; cat {r['cat_s']:.2f} s, fresh write "
              f"{r['fresh_s']:.2f} s ({r['fresh_pages']} pages), load {r['load_s']:.2f} s ({r['load_s'] / floor_seconds(r):.2f}x the floor); peak RSS "
              f"beyond the {size(r['weights'])} of weights {size(r['beyond'])} ({r['beyond'] / largest:.2f}x the "
              f"largest tensor, {size(largest)})", file=sys.stderr)
    print(HEADER)
    print("\n".join(row(r, largest, command.strip()) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
