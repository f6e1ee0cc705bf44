"""Drawing the next token inside the compiled steps: greedy, temperature, top-k, top-p, and token
masks — pure functions on (logits, keys). The settings come per row (sampling.knob_arrays), so a
batch can mix requests with different settings without recompiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per row: its request's seed folded with the position of the token being drawn, so a
    request samples the same tokens whatever else shares its batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def allowed_by_mask(mask: jax.Array, vocab: int) -> jax.Array:
    """Bitmask words [b, ceil(vocab/32)] int32 (bit i % 32 of word i // 32 allows token i, the
    layout llguidance fills) -> allowed [b, vocab] bool."""
    ids = jnp.arange(vocab, dtype=jnp.int32)
    words = jnp.take(mask, ids // 32, axis=1)
    return (jnp.right_shift(words, ids % 32) & 1) == 1


def _filtered_logits(logits, temperature, top_k, top_p):
    """Logits divided by temperature with everything outside top-k and top-p set to -inf."""
    x = logits / jnp.maximum(temperature, 1e-6)[:, None]
    desc = -jnp.sort(-x, axis=-1)
    v = x.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(jnp.arange(v)[None, :] < k[:, None], desc, -jnp.inf)
    # Nucleus: keep the shortest prefix of the sorted distribution whose mass reaches top_p (the
    # token that crosses the threshold is kept, so at least one token always survives).
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(x >= threshold, x, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits [b, v] float32, one key per row -> token ids [b] int32. Rows with temperature 0 take
    the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        filtered = _filtered_logits(logits, temperature, top_k, top_p)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # The sort over the vocabulary is skipped entirely when every row is greedy.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
