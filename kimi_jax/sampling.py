"""Token sampling: greedy, temperature, top-k, top-p — pure functions on (logits, key).

The knobs are per-row arrays inside the compiled step, so changing them never recompiles and a
server can mix requests with different settings in one batch.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.errors import KimiError

MAX_STOP_IDS = 12
# Halt ids a slot holds on the device: its stop ids and the few ids where its constraint (if any)
# needs the host back.
HALT_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (values are checked on creation)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise KimiError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise KimiError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise KimiError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KimiError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if len(self.stop_ids) > MAX_STOP_IDS:
            raise KimiError(f"at most {MAX_STOP_IDS} stop token ids, got {len(self.stop_ids)}")





def knob_arrays(params: list[SamplingParams], halts: list[tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Per-slot settings as the compiled steps take them. `halts[i]`: the ids at which slot i's
    row stops on the device (default: its stop ids), -1 padded to HALT_WIDTH."""
    halts = halts if halts is not None else [p.stop_ids for p in params]
    halt = np.full((len(params), HALT_WIDTH), -1, np.int32)
    for i, ids in enumerate(halts):
        if len(ids) > HALT_WIDTH:
            raise KimiError(f"at most {HALT_WIDTH} halt ids per request (stop ids and constraint boundaries), "
                            f"got {len(ids)}")
        halt[i, :len(ids)] = ids
    return {
        "temperature": np.asarray([p.temperature for p in params], np.float32),
        "top_k": np.asarray([p.top_k for p in params], np.int32),
        "top_p": np.asarray([p.top_p for p in params], np.float32),
        "seed": np.asarray([p.seed % 2**32 for p in params], np.uint32),
        "halt": halt,
    }


def allowed_by_mask(mask: jax.Array, vocab: int) -> jax.Array:
    """Bitmask words [b, ceil(vocab/32)] int32 (bit i % 32 of word i // 32 allows token i, the
    layout llguidance fills) -> allowed [b, vocab] bool."""
    ids = jnp.arange(vocab, dtype=jnp.int32)
    words = jnp.take(mask, ids // 32, axis=1)
    return (jnp.right_shift(words, ids % 32) & 1) == 1


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per row: its request's seed folded with the position of the token being drawn, so a
    request samples the same tokens whatever else shares its batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def checkpoint_defaults(checkpoint: str) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (greedy when absent): keys
    temperature, top_p, top_k, max_new_tokens, each only when the file sets it."""
    path = os.path.join(checkpoint, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    elif isinstance(gen.get("temperature"), (int, float)):
        out["temperature"] = float(gen["temperature"])
    for key in ("top_p", "top_k", "max_new_tokens"):
        if isinstance(gen.get(key), (int, float)):
            out[key] = gen[key]
    return out


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
