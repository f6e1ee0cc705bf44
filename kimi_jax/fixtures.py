"""Tiny random checkpoints in the exact official layout, for tests, benchmarks and demos.

The weights are drawn directly in the checkpoint's own tensor names and [out, in] shapes from the
tensor table, at scales that keep activations O(1) (so routing and attention are far from uniform
and a layout mistake shows up as a large logit difference). Routed experts are quantized with the
compressed-tensors quantizer when the config asks for INT4.
"""

from __future__ import annotations

import math
import os

import numpy as np

from kimi_jax import export
from kimi_jax.checkpoint.tensor_table import tensor_table, weight_shape_names
from kimi_jax.config import Config


def random_hf_tensors(cfg: Config, seed: int = 0):
    """Yield (name, array) for every tensor of `cfg` in checkpoint order."""
    rng = np.random.default_rng(seed)
    seen = set()
    for entry in tensor_table(cfg):
        for name in entry.hf:
            if name in seen:  # kv_b_proj backs two parameters
                continue
            seen.add(name)
            shape = entry.hf_shape
            if entry.leaf == "scale":
                continue  # written together with its packed words below
            if name.endswith("e_score_correction_bias"):
                yield name, (0.05 * rng.standard_normal(shape)).astype(np.float32)
            elif len(shape) == 1:  # norm weights: near one, not exactly, so a missing norm shows
                yield name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            elif name == "model.embed_tokens.weight":
                yield name, _normal(rng, shape)
            elif entry.leaf == "packed":
                out_f = shape[0]
                in_f = cfg.moe_intermediate_size if ".down_proj." in name else cfg.hidden_size
                w = rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)
                from kernels_pallas.int4_ct import quantize_int4

                packed, scale = quantize_int4(w, cfg.quantization.group_size)
                yield name, packed
                yield name.replace("weight_packed", "weight_scale"), scale
            else:
                yield name, _normal(rng, shape, np.sqrt(shape[-1]))
    for name, shape in weight_shape_names(cfg).items():
        yield name, np.asarray(shape, np.int64)


def _normal(rng, shape, divisor=1.0) -> np.ndarray:
    """float32 normal draws divided by `divisor`, drawn a million at a time: the same numbers as one
    float64 draw of the whole shape, without a vocabulary-sized float64 matrix in memory."""
    out = np.empty(math.prod(shape), np.float32)
    for i in range(0, out.size, 1 << 20):
        out[i:i + (1 << 20)] = rng.standard_normal(min(1 << 20, out.size - i)) / divisor
    return out.reshape(shape)


def with_fixture_token_ids(cfg: Config) -> Config:
    """Special-token ids for a vocabulary whose last 256 ids are K2's reserved special slots."""
    base = cfg.vocab_size - 256
    return cfg.replace(bos_token_id=base, eos_token_id=base + 2, pad_token_id=base + 255)


def make_fixture_checkpoint(directory, cfg: Config, *, seed: int = 0, max_shard_bytes: int = 1 << 20,
                            tokenizer: bool = True) -> None:
    """Write a random checkpoint (several shards, so the index path is exercised) and, by default,
    a byte-level tokenizer and the project's chat template."""
    export.write_checkpoint(directory, cfg, random_hf_tensors(cfg, seed), max_shard_bytes=max_shard_bytes)
    if tokenizer:
        write_fixture_tokenizer(directory, cfg)


def write_fixture_tokenizer(directory, cfg: Config) -> None:
    from kimi_jax.chat.template import ChatTemplate
    from kimi_jax.chat.tokenizer import byte_level_ranks, write_tokenizer_files

    ranks = byte_level_ranks()
    n_special = 256
    if cfg.vocab_size < len(ranks) + n_special:
        raise ValueError(f"vocab_size {cfg.vocab_size} < 256 byte tokens + 256 special slots")
    write_tokenizer_files(directory, ranks)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(ChatTemplate.default().source)
