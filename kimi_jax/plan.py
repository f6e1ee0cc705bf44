"""`python -m kimi_jax.plan`: does a model fit a machine, on which mesh, and with how much context?

For a target machine (--target: a GPU host, a TPU topology, this machine's devices) the planner
builds the whole model from abstract arrays (nothing is allocated), places it on every mesh the
devices can form, and reports per device the weights and the engine's latent cache (exact, from
the shardings) and the temporaries of the runtime's prefill and decode programs: compiled for the
target where this machine can (libtpu for TPUs, XLA:GPU with the GPUs present), else from a stated
activation model. The best mesh is the one leaving the longest context; the others get the reason.

    python -m kimi_jax.plan --config k2-thinking                     # 8 x H200, or this machine's GPUs/TPUs
    python -m kimi_jax.plan --config k2-thinking --target v5p:2x2x2  # a TPU v5p slice of 8 chips
    python -m kimi_jax.plan --table                                  # the hardware table of the docs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_TARGET = "h200"  # without GPUs or TPUs here, and no --target: the usual 8-GPU host for K2


def _start_jax(target: str, devices: int | None) -> None:
    """Fake host devices for GPU-model and cpu meshes must be asked for before JAX starts; a TPU
    topology is only compiled for, never run on."""
    from kimi_jax.planner.targets import GPU_HOST, uses_host_devices

    if "jax" in sys.modules:
        return  # already running (tests, a notebook): targets.resolve checks there are enough devices
    if uses_host_devices(target) or target == "auto":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices or GPU_HOST}".strip()
    if not uses_host_devices(target) and target != "auto":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def plan(cfg, target: str = "local", *, config_name: str | None = None, mesh: str | None = None,
         max_len: int = 262144, batch: int = 1, chunk: int | None = None, dtype: str = "bfloat16",
         devices: int | None = None, hbm_gb: float | None = None, gpu_fraction: float | None = None,
         layers: str = "scaled", recorded: dict | None = None, progress=_progress):
    """Plan `cfg` (a Config) on `target` (see --target; "local" is this machine's GPUs or TPUs) and
    return a planner.search.Plan; `print_plan` shows it as the command line does. Progress lines go
    to `progress` (stderr by default; None for silence)."""
    from kimi_jax.errors import KimiError
    from kimi_jax.planner import search, targets
    from kimi_jax.scheduler import DEFAULT_CHUNK

    if max_len > cfg.max_position_embeddings:
        raise KimiError(f"--max-len {max_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    progress = progress or (lambda text: None)
    t = targets.resolve(target, devices, hbm_gb=hbm_gb, gpu_fraction=gpu_fraction)
    name = config_name or cfg.model_type
    progress(f"planning {name} on {t.label}: temporaries {t.temporaries}")
    return search.plan(cfg, t, config_name=name, max_len=max_len, batch=batch, chunk=chunk or DEFAULT_CHUNK,
                       dtype=dtype, mesh_text=mesh, layers=layers, recorded=recorded, progress=progress)


def plan_for(args, target: str, **kw):
    """`plan` with the command line's settings."""
    from kimi_jax.config import Config, get_preset

    cfg = Config.from_hf(args.config) if os.path.exists(args.config) else get_preset(args.config)
    return plan(cfg, target, config_name=args.config, mesh=args.mesh, max_len=args.max_len, batch=args.batch,
                chunk=args.chunk, dtype=args.dtype, devices=args.devices, hbm_gb=args.hbm_gb, layers=args.layers,
                **kw)


def to_json(p) -> dict:
    """Everything a plan found, as plain data."""
    t = p.target
    meshes = []
    for m in p.meshes:
        temps = m.temporaries or {}
        meshes.append({**vars(m.memory), "prefill_temp_bytes": temps.get("prefill"),
                       "decode_temp_bytes": temps.get("decode"), "temporaries_from": temps.get("how"),
                       "compile_seconds": temps.get("seconds"), "refused": temps.get("refused") or None,
                       "fits": m.fits, "verdict": m.verdict})
    best = meshes[p.meshes.index(p.best)]
    return {"config": p.config, "target": t.name, "hardware": t.label, "platform": t.platform,
            "devices": t.n_devices, "memory_bytes": t.memory, "memory_from": t.memory_note,
            "temporaries_from": t.temporaries, "batch": p.batch, "max_len": p.max_len, "chunk": p.chunk,
            "dtype": p.dtype, "kernels": p.backend.impl, "expert_packing": p.backend.expert_packing,
            "page_order": p.backend.page_order, "max_positions": p.max_positions, "seconds": p.seconds,
            "best": best, "meshes": meshes}


def _context(tokens: int, limit: int) -> str:
    return f"{tokens:,}" if tokens <= limit else f"{limit:,} (memory for {tokens:,})"


def print_plan(p) -> None:
    from kimi_jax.cache import POOL_SEQUENCES_PER_SLOT
    from kimi_jax.planner.memory import gb
    from kimi_jax.planner.targets import JAX_GPU_MEMORY_FRACTION

    t, best, m = p.target, p.best, p.best.memory
    print(f"{p.config} on {t.label}, {p.dtype}, batch {p.batch}, --max-len {p.max_len:,}")
    print(f"memory per device for XLA: {gb(t.memory) + ', ' if t.memory else ''}{t.memory_note}")
    for mp in p.meshes:
        if mp is best and mp.verdict == "best":
            print(f"mesh {mp.mesh}: best" + (f", {mp.fits[p.batch]:,} tokens at batch {p.batch}" if mp.fits else ""))
        else:
            print(f"mesh {mp.mesh}: {mp.verdict}")
    temps = best.temporaries or {}
    again = "as much again" if POOL_SEQUENCES_PER_SLOT == 2 else f"{POOL_SEQUENCES_PER_SLOT - 1}x that"
    print(f"\n| per device, mesh {best.mesh} | bytes |\n|---|---|")
    print(f"| weights (routed experts) | {gb(m.weight_bytes)} ({gb(m.expert_weight_bytes)}) |")
    print(f"| latent cache: the engine's pool of {m.pages:,} pages of {m.page_size} tokens (batch {p.batch} x "
          f"{p.max_len:,} tokens, and {again} for cached prefixes) | {gb(m.cache_bytes)} |")
    if temps:
        print(f"| prefill temporaries (a {p.chunk}-token chunk) | {gb(temps['prefill'])} |")
        print(f"| decode temporaries (a block of decode steps) | {gb(temps['decode'])} |")
        print(f"\ntemporaries: {temps['how']}")
        for name, message in (temps.get("refused") or {}).items():
            print(f"{name}: the compiler refused the whole program: {message}")
    if not t.memory:
        print("no memory size to fit against: give --hbm-gb")
    elif best.fits and best.fits[p.batch] > 0:
        need = m.weight_bytes + m.cache_bytes + best.temp_bytes
        if need <= t.memory:
            print(f"--max-len {p.max_len:,} at batch {p.batch} fits: {gb(need)} of {gb(t.memory)} per device")
        else:
            print(f"--max-len {p.max_len:,} at batch {p.batch} does not fit: {gb(need)} of {gb(t.memory)} per device; "
                  f"--max-len {min(best.fits[p.batch], p.max_positions):,} does")
        cells = ", ".join(f"batch {b}: {_context(n, p.max_positions)}" for b, n in best.fits.items())
        print(f"longest context per sequence: {cells}")
    else:
        print(f"{p.config} does not fit {t.label} on any mesh")
    short = not best.fits or best.fits[p.batch] < min(p.max_len, p.max_positions)
    if short and t.platform == "gpu" and t.memory_note.startswith(f"{JAX_GPU_MEMORY_FRACTION:g} "):
        print("XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the environment gives XLA more of each GPU: plan with it set")
    print(f"planned in {p.seconds:.1f} s")


def main(argv=None) -> int:
    from kimi_jax.planner.targets import TARGETS_HELP
    from kimi_jax.scheduler import DEFAULT_CHUNK

    ap = argparse.ArgumentParser(prog="python -m kimi_jax.plan", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="k2-thinking", help="preset name (k2-thinking, tiny) or a config.json path")
    ap.add_argument("--target", default="auto", help=f"{TARGETS_HELP}; auto: this machine's GPUs or TPUs, else "
                                                     f"{DEFAULT_TARGET}")
    ap.add_argument("--devices", type=int, default=None, help="devices of a GPU or cpu target (default: 8, a host; "
                                                              "a TPU topology and local have their own)")
    ap.add_argument("--mesh", help="data=..,expert=..,tensor=.. (default: plan every split of the devices and "
                                   "pick the one that leaves the longest context)")
    ap.add_argument("--hbm-gb", type=float, default=None, help="memory per device in GB to fit against, instead "
                                                               "of the target's")
    ap.add_argument("--max-len", type=int, default=262144, help="cache capacity in tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (engine slots)")
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prefill chunk size (the runtime's)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--layers", choices=("scaled", "all"), default="scaled",
                    help="compile the model cut to a few layers and extrapolate, or all of its layers")
    ap.add_argument("--table", action="store_true", help="plan the hardware table of README.md and the docs and "
                                                        "print it (with --write, put it into those files)")
    ap.add_argument("--write", action="store_true", help="with --table: update the table in README.md, the "
                                                        "notebook, the docs and docs/hardware-table.json")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from kimi_jax.errors import KimiError

    t0 = time.perf_counter()
    try:
        if args.batch < 1 or args.max_len < 1 or (args.devices is not None and args.devices < 1):
            raise KimiError("--devices, --batch and --max-len must be >= 1")
        if args.write and not args.table:
            raise KimiError("--write goes with --table")
        if args.table:
            from kimi_jax.planner import table

            _start_jax("auto", None)
            return table.main(args, plan_for, to_json, write=args.write)
        _start_jax(args.target, args.devices)
        target = args.target
        if target == "auto":
            import jax

            target = "local" if jax.default_backend() in ("gpu", "tpu") else DEFAULT_TARGET
            if target == DEFAULT_TARGET:
                _progress(f"no GPU or TPU here: planning for --target {DEFAULT_TARGET} ({TARGETS_HELP})")
        p = plan_for(args, target)
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(p)))
    else:
        print_plan(p)
    _progress(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
