"""The two compiled programs: a prefill chunk and a decode step over the paged latent cache.

Both are plain module-level jitted functions of (model graph, weights, cache, tokens, ...): every
engine, the planner and the benchmarks call these same functions, so two engines with the same
shapes share one compiled program. The graph definition is a static argument; the weights, the
cache and the per-slot sampling settings are arrays, so nothing recompiles between requests.

    prefill_step — R rows of C tokens, each row continuing one slot of the cache from its length
    decode_step  — one token for every slot of the cache; inactive slots compute and discard

The cache is donated: each layer's page pool is updated in place. Sampling happens inside both
programs (one key per row: the row's seed folded with the position drawn), so a step is a single
dispatch and its tokens never need the host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax.cache import PagedCache
from kimi_jax.sampling import row_keys, sample


def _sample_rows(logits, knobs, rows, positions):
    """Sample each row with the settings of slot rows[i]; positions[i] is the drawn token's place."""
    pick = {k: jnp.take(v, rows, axis=0, mode="clip") for k, v in knobs.items()}
    keys = row_keys(pick.pop("seed"), positions)
    return _replicated(sample(logits, keys, **pick))


def _replicated(x):
    """Sampled tokens go to every device, so each host of a multi-host run can read them locally."""
    mesh = jax.sharding.get_abstract_mesh()
    return x if mesh.empty else jax.lax.with_sharding_constraint(x, P())


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_step(graphdef, state, cache: PagedCache, tokens, slots, q_start, n_valid, knobs):
    """Write R chunks into the cache and sample each row's next token.

    tokens [R, C]: row i continues slot slots[i] from position q_start[i] (its current length) with
    n_valid[i] real tokens. Padding rows (n_valid 0) must name slot `cache.slots` (out of range):
    they write only the discard page and change nothing. Returns (sampled tokens [R], last-token
    logits [R, V] float32, cache with the rows' lengths advanced)."""
    model = nnx.merge(graphdef, state)
    batch = cache.chunk_batch(model.cfg, slots, q_start, n_valid, tokens.shape[1])
    h, cache = model.forward_cached(tokens, batch, cache)
    last = jnp.take_along_axis(h, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)
    lengths = cache.lengths.at[slots].set(q_start + n_valid, mode="drop")
    next_tokens = _sample_rows(logits, knobs, slots, q_start + n_valid)
    return next_tokens, logits, dataclasses.replace(cache, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "want_logits"), donate_argnames=("cache",))
def decode_step(graphdef, state, cache: PagedCache, tokens, active, knobs, want_logits: bool = False):
    """Feed tokens [S] (one per slot) at each active slot's length and sample the next ones.

    Returns (next tokens [S], logits [S, V] float32 or None, cache with active slots one longer)."""
    model = nnx.merge(graphdef, state)
    batch = cache.decode_batch(model.cfg, active)
    h, cache = model.forward_cached(tokens[:, None], batch, cache)
    logits = model.logits(h[:, 0])
    lengths = cache.lengths + active.astype(jnp.int32)
    slots = jnp.arange(cache.slots, dtype=jnp.int32)
    next_tokens = _sample_rows(logits, knobs, slots, lengths)
    return next_tokens, (logits if want_logits else None), dataclasses.replace(cache, lengths=lengths)


@jax.jit
def put_rows(tokens, rows, values, mask):
    """tokens[rows[i]] = values[i] where mask[i]: hand prefilled rows' first tokens to decode."""
    return tokens.at[jnp.where(mask, rows, tokens.shape[0])].set(values, mode="drop")


def compile_counts() -> dict[str, int]:
    """Programs compiled so far by each step function (tests assert that shapes, not prompts,
    decide this)."""
    return {"prefill": prefill_step._cache_size(), "decode": decode_step._cache_size()}
