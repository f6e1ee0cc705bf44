"""Write a small random K2-architecture checkpoint in the exact official layout.

    python scripts/make_fixture_checkpoint.py --out /tmp/k2-fixture            # bf16 weights
    python scripts/make_fixture_checkpoint.py --out /tmp/k2-int4 --int4        # pack-quantized experts

The directory holds config.json (with quantization_config for --int4), safetensors shards with
model.safetensors.index.json, compressed-tensors `weight_packed`/`weight_scale`/`weight_shape`
tensors for the routed experts, a byte-level tiktoken.model with K2's special-token slots,
tokenizer_config.json, the chat template and generation_config.json. transformers (with
compressed-tensors) loads it too, which is what the parity tests compare against. The tests write
theirs through the same function, `kimi_jax.fixtures.make_fixture_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """The flags that pick the fixture's config (also used by bench_load.py)."""
    ap.add_argument("--preset", default="tiny", help="config preset to start from (default: tiny)")
    ap.add_argument("--int4", action="store_true", help="routed experts as compressed-tensors pack-quantized INT4")
    ap.add_argument("--group-size", type=int, default=16, help="INT4 group size (K2 uses 32)")
    ap.add_argument("--layers", type=int, help="num_hidden_layers")
    ap.add_argument("--experts", type=int, help="n_routed_experts")


def fixture_config(args):
    """The config those flags describe, with the fixture tokenizer's special-token ids."""
    from kimi_jax.config import Int4Quant, get_preset
    from kimi_jax.fixtures import with_fixture_token_ids

    cfg = get_preset(args.preset)
    changes = {"quantization": Int4Quant(group_size=args.group_size) if args.int4 else None}
    if args.layers:
        changes["num_hidden_layers"] = args.layers
    if args.experts:
        changes["n_routed_experts"] = args.experts
    return with_fixture_token_ids(cfg.replace(**changes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    add_config_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kimi_jax.errors import KimiError
    from kimi_jax.fixtures import make_fixture_checkpoint

    try:
        make_fixture_checkpoint(args.out, fixture_config(args), seed=args.seed)
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
