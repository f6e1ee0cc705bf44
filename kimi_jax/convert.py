"""`python -m kimi_jax.convert --checkpoint HF_DIR --out DIR`: save loaded params as an orbax checkpoint.

The converted directory holds the parameters exactly as the model holds them (INT4 experts still
packed) in an orbax checkpoint, restored straight onto the devices by `load_converted`. The config,
tokenizer and template files are copied alongside, so `generate --checkpoint DIR` accepts either
kind of directory. Converting is a choice of storage format, not a speed-up: the HF loader copies
the official files once, straight into device buffers, and has measured faster than this restore
(`scripts/bench_load.py --orbax` times both on the same weights).

The marker file records a format version: parameter paths follow the model's structure, so when
that changes (version 2: one parameter per layer, `layers/<i>/...`) an older directory is refused
with a message to convert again, rather than failing inside orbax.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax.numpy as jnp
from flax import nnx

from kimi_jax.config import Config
from kimi_jax.errors import KimiError

MARKER = "kimi_jax_convert.json"
VERSION = 2
PARAMS = "params"
SIDE_FILES = ("config.json", "generation_config.json", "tiktoken.model", "tokenizer_config.json",
              "chat_template.jinja")


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


def convert(checkpoint: str, out: str, *, dtype=jnp.bfloat16, progress: bool = True) -> None:
    import orbax.checkpoint as ocp

    from kimi_jax.checkpoint import load_model

    if os.path.exists(out) and os.listdir(out):
        raise KimiError(f"--out {out} exists and is not empty")
    model, cfg = load_model(checkpoint, dtype=dtype, progress=progress, expert_packing="ct")
    os.makedirs(out, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(os.path.join(out, PARAMS)), state)
    for name in SIDE_FILES:
        src = os.path.join(checkpoint, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out, name))
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        json.dump({"format": "kimi_jax-orbax", "version": VERSION, "dtype": jnp.dtype(dtype).name,
                   "source": os.path.abspath(checkpoint)}, f, indent=2)


def load_converted(directory: str, cfg: Config, *, dtype=jnp.bfloat16, mesh=None):
    """Restore a converted directory straight onto the devices of `mesh` (or the default device).
    Experts are stored in the checkpoint's packing and repacked into the devices' own after restoring."""
    import orbax.checkpoint as ocp

    from kernels_pallas.backends import backend_for
    from kimi_jax.checkpoint.expert_repacking import repack_experts
    from kimi_jax.model import abstract_model, expert_packing_for
    from kimi_jax.sharding import placed_abstract, platform_of

    marker = os.path.join(directory, MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            version = json.load(f).get("version")
    except (OSError, ValueError, AttributeError) as e:
        raise KimiError(f"{marker}: not a readable conversion marker ({e})") from None
    if version != VERSION:
        raise KimiError(f"{directory}: converted in format version {version}, but this kimi_jax reads version "
                        f"{VERSION}; convert the original checkpoint again with python -m kimi_jax.convert")
    graphdef, state = abstract_model(cfg, dtype)
    targets = nnx.to_pure_dict(placed_abstract(state, mesh))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(os.path.abspath(os.path.join(directory, PARAMS)), targets)
    except Exception as e:  # orbax raises many kinds; the user needs the directory and the cause
        raise KimiError(f"{directory}: cannot restore converted parameters ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(state, restored)
    packing = expert_packing_for(cfg, backend_for(platform_of(mesh)))
    if packing != "ct":
        target_graph, target = abstract_model(cfg, dtype, expert_packing=packing)
        repack, loaded = repack_experts(target, mesh), dict(nnx.to_flat_state(state))
        for path, var in nnx.to_flat_state(target):
            var.set_value(repack(path, loaded[path].get_value()))
        graphdef, state = target_graph, target
    return nnx.merge(graphdef, state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF-layout checkpoint directory")
    p.add_argument("--out", required=True, help="new directory for the converted checkpoint")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        convert(args.checkpoint, args.out, dtype=jnp.dtype(args.dtype))
        print(f"converted {args.checkpoint} -> {args.out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return 0
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
