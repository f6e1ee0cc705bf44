"""Build the copy model: a two-layer K2-architecture checkpoint whose weights are set by hand so that
it continues repeated text, the model speculative decoding's benchmarks need (bench_speculate.py).

    PYTHONPATH=. python scripts/make_copy_model.py            # -> scripts/copy_model/ in ~10 s

The bundled nano model was trained on agent conversations and drifts into its own phrases when it
should copy; a random model copies nothing; a small model trained here for half an hour on repeated
text did not learn to copy either (induction forms late). So the copying circuit is written into
the weights directly. It is an induction head, the mechanism trained models use:

  - The residual stream holds separate subspaces: T (the token, a fixed random unit vector per
    token), P1..Pm (the m previous tokens), O (the predicted token) and one constant coordinate.
  - Layer 0 (dense): head j attends from position t to position t - j (only by rotary position:
    its query and key are rope vectors made from the constant coordinate, the query turned back
    by j positions, so the score peaks there; rope_theta 10 gives all 32 frequency pairs a say)
    and copies that position's token into Pj.
  - Layer 1 (MoE): head 0's query is the last m tokens (T, P1..P(m-1)), its key at position s the m
    tokens before s (P1..Pm): it finds where the latest m tokens occurred before and reads the
    token that followed them into O. The equal weights of the m tokens prefer the position that
    matches all of them, then most of them.
  - The MLPs and experts output zero; lm_head reads O.

It copies with a context of m tokens: where those occur more than once with different successors
(repetitive code) it may jump to another place and copy from there, as a weak copier would. It is
not a chat model and says nothing useful where nothing repeats: use it raw.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "copy_model")
TOKENIZER = os.path.join(ROOT, "checkpoints", "kimi-k2-nano")

CONTEXT = 5  # m: tokens matched before copying
TOKEN_DIMS = 80  # width of each subspace: random unit token vectors meet at ~1/sqrt(80)
PREV_SCORE_MARGIN = 25.0  # layer 0: attention logits between the wanted position and the best other
MATCH_SCORE = 24.0  # layer 1: attention logits per matched token
READOUT = 40.0  # lm_head logit of the copied token (others: about READOUT / sqrt(TOKEN_DIMS) at most)


def copy_config(tokenizer, max_len: int):
    from kimi_jax.config import Config

    m, k = CONTEXT, TOKEN_DIMS
    hidden = -(-((m + 2) * k + 1) // 8) * 8  # T, P1..Pm, O and the constant
    return Config(
        vocab_size=tokenizer.n_vocab, hidden_size=hidden, intermediate_size=32, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, q_lora_rank=m * k, kv_lora_rank=(m + 1) * k,
        qk_nope_head_dim=m * k, qk_rope_head_dim=64, v_head_dim=k, num_attention_heads=m, rope_theta=10.0,
        rope_scaling=None, max_position_embeddings=max_len, rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.im_end_id, pad_token_id=tokenizer.token_id("[PAD]"), quantization=None)


def copy_weights(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's parameters by their nnx paths ("layers.0.attn.q_b_proj", ...), float32."""
    from kimi_jax import rope

    m, k, d, v = CONTEXT, TOKEN_DIMS, cfg.hidden_size, cfg.vocab_size
    n, p, r, q, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.num_attention_heads
    T, P, O, ONE = 0, lambda j: j * k, (m + 1) * k, (m + 2) * k  # subspace offsets in the residual
    eye = np.eye(k, dtype=np.float32)
    scale = rope.softmax_scale(cfg)
    tokens = np.random.default_rng(seed).standard_normal((v, k)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    w: dict[str, np.ndarray] = {}

    embed = np.zeros((v, d), np.float32)
    embed[:, T:T + k], embed[:, ONE] = tokens, 1.0
    w["embed"] = embed
    head = np.zeros((v, d), np.float32)
    head[:, O:O + k] = READOUT * tokens
    w["lm_head"] = head

    def norm_for(pieces: int, width: int) -> np.ndarray:
        """An rms_norm weight that gives back a vector of `pieces` unit pieces in `width` dims."""
        return np.full(width, math.sqrt(pieces / width), np.float32)

    for i in range(2):
        a = f"layers.{i}.attn."
        for name, shape in (("q_a_proj", (q, d)), ("q_b_proj", (h, n + p, q)), ("kv_a_proj", (r + p, d)),
                            ("k_b_proj", (h, n, r)), ("v_b_proj", (h, k, r)), ("o_proj", (d, h, k))):
            w[a + name] = np.zeros(shape, np.float32)
    # Layer 0: input [token, 1]; head j-1 attends j positions back and writes that token into Pj.
    w["layers.0.input_norm"] = norm_for(2, d)
    w["layers.0.attn.q_a_proj"][0, ONE] = 1.0
    w["layers.0.attn.q_a_norm"] = norm_for(1, q)
    freq = rope.inv_freq(cfg)
    pairs = p // 2
    # Every pair gets the same weight: sum_i cos((t - s - j) f_i) peaks at s = t - j, and its best
    # other value (the neighbours) is `margin` below, for all distances up to max_len.
    distances = np.arange(-m, cfg.max_position_embeddings)
    distances = distances[distances != 0]
    margin = pairs - np.cos(distances[:, None] * freq[None]).sum(1).max()
    amplitude = math.sqrt(PREV_SCORE_MARGIN / (margin * scale))
    key = np.zeros(p, np.float32)
    key[0::2] = amplitude
    w["layers.0.attn.kv_a_proj"][r:, ONE] = key
    w["layers.0.attn.kv_a_proj"][:k, T:T + k] = eye
    w["layers.0.attn.kv_a_norm"] = norm_for(1, r)
    for j in range(1, m + 1):
        angle = -j * freq  # the key turned back by j positions
        query = np.zeros(p, np.float32)
        query[0::2], query[1::2] = amplitude * np.cos(angle), amplitude * np.sin(angle)
        w["layers.0.attn.q_b_proj"][j - 1, n:, 0] = query
        w["layers.0.attn.v_b_proj"][j - 1, :, :k] = eye
        w["layers.0.attn.o_proj"][P(j):P(j) + k, j - 1, :] = eye
    # Layer 1: input [token, P1..Pm, 1]; head 0 matches (token, P1..P(m-1)) here against (P1..Pm)
    # there and writes the token found there into O.
    w["layers.1.input_norm"] = norm_for(m + 2, d)
    a = "layers.1.attn."
    for j in range(m):
        w[a + "q_a_proj"][j * k:(j + 1) * k, P(j):P(j) + k] = eye  # P(0) is T
        w[a + "k_b_proj"][0, j * k:(j + 1) * k, (j + 1) * k:(j + 2) * k] = (MATCH_SCORE / scale) * eye
    w[a + "q_a_norm"] = norm_for(m, q)
    w[a + "q_b_proj"][0, :n, :] = np.eye(n, q, dtype=np.float32)
    for j in range(m + 1):  # latent: [token, P1..Pm]
        w[a + "kv_a_proj"][j * k:(j + 1) * k, P(j):P(j) + k] = eye
    w[a + "kv_a_norm"] = norm_for(m + 1, r)
    w[a + "v_b_proj"][0, :, :k] = eye
    w[a + "o_proj"][O:O + k, 0, :] = eye
    w["norm"] = norm_for(m + 3, d)
    return w


def copy_model(tokenizer, max_len: int = 16384):
    """The copy model (a float32 `KimiK2`) for `tokenizer`'s vocabulary."""
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.model import KimiK2

    cfg = copy_config(tokenizer, max_len)
    model = KimiK2(cfg, dtype=jnp.float32, rngs=nnx.Rngs(params=0))
    weights = copy_weights(cfg)
    params = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        name = ".".join(str(x) for x in path)
        if name in weights:
            var.set_value(jnp.asarray(weights.pop(name)))
        elif name.endswith("down_proj"):  # every MLP and expert outputs zero
            var.set_value(jnp.zeros_like(var.get_value()))
    nnx.update(model, params)
    if weights:
        raise RuntimeError(f"no such parameters: {sorted(weights)}")
    return model


def build(out: str = DEFAULT_OUT, tokenizer_dir: str = TOKENIZER, max_len: int = 16384) -> str:
    """Write the copy model to `out` (replacing it) as a bf16 checkpoint and return `out`."""
    from train_nano import write_model_dir

    from kimi_jax.chat import Tokenizer

    model = copy_model(Tokenizer.from_dir(tokenizer_dir), max_len)
    write_model_dir(out, model, tokenizer_dir, {"bos_token_id": model.cfg.bos_token_id, "do_sample": False,
                                                "max_new_tokens": 256})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--tokenizer", default=TOKENIZER, help="a directory with tiktoken.model (default: the nano model's)")
    ap.add_argument("--max-len", type=int, default=16384)
    args = ap.parse_args(argv)
    print(f"wrote {build(args.out, args.tokenizer, args.max_len)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
