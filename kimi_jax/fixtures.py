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
from kimi_jax.config import K2_THINKING, TINY, Config

# K2 Thinking's rotary settings exactly (64 rope dims, theta 50,000, YaRN factor 64 over 4,096 with
# beta 1/1 and mscale 1/1, 262,144 positions) on a 2-layer, 1-head model small enough that prompts of
# 100K+ tokens run on a CPU (attention over the whole context is what such a prompt costs). The
# long-context parity checks and the bf16 drift benchmark write it with a `rope_gain`, so that
# attention is peaked.
LONG_CONTEXT = TINY.replace(
    num_hidden_layers=2, num_attention_heads=1, qk_rope_head_dim=K2_THINKING.qk_rope_head_dim,
    rope_theta=K2_THINKING.rope_theta, rope_scaling=K2_THINKING.rope_scaling,
    max_position_embeddings=K2_THINKING.max_position_embeddings)


def random_hf_tensors(cfg: Config, seed: int = 0, rope_gain: float = 1.0):
    """Yield (name, array) for every tensor of `cfg` in checkpoint order. `rope_gain` multiplies the
    weights that make the rotated query and key parts (see `with_rope_gain`)."""
    if rope_gain != 1.0:
        yield from with_rope_gain(random_hf_tensors(cfg, seed), cfg, rope_gain)
        return
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


def motif_prompt(cfg: Config, n: int, seed: int = 0, motif_len: int = 24, n_motifs: int = 16) -> list[int]:
    """n random token ids in which a quarter of the text is copies of `n_motifs` fixed motifs: a
    repeated motif brings keys of the same content at many distances, so which copy a query attends
    to is decided by the rotation alone."""
    rng = np.random.default_rng(seed)
    motifs = rng.integers(0, cfg.vocab_size, (n_motifs, motif_len))
    pieces, length = [], 0
    while length < n:
        piece = motifs[rng.integers(n_motifs)] if rng.random() < 0.25 else rng.integers(0, cfg.vocab_size, motif_len)
        pieces.append(piece)
        length += motif_len
    return np.concatenate(pieces)[:n].tolist()


def with_rope_gain(tensors, cfg: Config, gain: float):
    """Scale the rows of q_b_proj (or q_proj) and kv_a_proj_with_mqa that produce q_pe and k_pe by
    `gain`: the rope part of every attention logit grows by gain², so attention is peaked and
    decided by relative position, and a rotation off by a few thousandths of a radian changes the
    output. The long-context parity checks use it; the other weights keep their scale."""
    n, p, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    for name, w in tensors:
        if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            w = w.reshape(cfg.num_attention_heads, n + p, -1).copy()
            w[:, n:] *= gain
            w = w.reshape(-1, w.shape[-1])
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            w = w.copy()
            w[r:] *= gain
        yield name, w


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
                            tokenizer: bool = True, rope_gain: float = 1.0) -> None:
    """Write a random checkpoint (several shards, so the index path is exercised) and, by default,
    a byte-level tokenizer and the project's chat template. `rope_gain`: see `with_rope_gain`."""
    export.write_checkpoint(directory, cfg, random_hf_tensors(cfg, seed, rope_gain), max_shard_bytes=max_shard_bytes)
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
