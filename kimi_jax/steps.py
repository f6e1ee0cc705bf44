"""The compiled programs of generation: a prefill chunk and a block of decode steps, over the paged
latent cache and the per-slot decode state.

    prefill_step  — R rows of C prompt tokens, each row continuing one slot of the cache
    decode_steps  — up to `max_steps` decode steps for B packed rows, each row one slot, in one dispatch

Every engine, the planner and the benchmarks call these module-level jitted functions, so engines
with the same shapes share one compiled program. Their arguments are plain pytrees:

- the model as `(ModelDef, weights)`: the graph and tree structure, static and hashed once, and the
  weights as a flat list of arrays. Handing jit an nnx (GraphDef, State) instead re-hashes the
  graph on every call: 9 ms per dispatch for the 61 layers of K2, more than a whole decode step at
  the memory roofline (BENCHMARKS.md, scripts/bench_host.py).
- the cache (`PagedCache`, donated: each layer's pool is updated in place) and the decode state
  (`SlotState`, donated): per slot the token it feeds next, whether it is generating, and how many
  more tokens it may sample. The state stays on the device between dispatches, so the host can
  queue the next block before it has read this one.
- per-slot sampling knobs (`sampling.knob_arrays`), uploaded only when a request is admitted.

Rows stop on the device: a row that samples one of its halt ids (its stop ids, and the ids where a
constraint needs the host back) or exhausts its budget is no longer `alive`; it writes nothing and
samples nothing in the remaining steps of the block and in later blocks until the host re-arms it.
Decode rows are packed: `rows[b]` names the slot row b runs (`cache.slots` for padding), so a
block's cost follows the active requests, not the engine's slot count. Rows that are not alive and
the padding of a prefill chunk take no expert (moe.dispatch).

Sampling happens inside (one key per row: the request's seed folded with the drawn token's
position), so a request samples the same tokens whatever shares its batch and whatever the block
length. An optional `mask` (int32 bitmask words [rows, ceil(V/32)]) restricts each row's next token
(constrained decoding); a program without it contains no masking at all.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax.cache import PagedCache
from kimi_jax.distributed import global_array
from kimi_jax.draw import allowed_by_mask, row_keys, sample


class ModelDef:
    """The static half of a model split for the compiled steps: its graph definition and the tree
    of its weights. Equal structures are interned to one object, so jit's static-argument check
    is an identity test and a stored hash; the graph itself is hashed once, in `split_model`."""

    _interned: dict = {}

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    @classmethod
    def of(cls, graphdef, treedef) -> "ModelDef":
        key = cls(graphdef, treedef)
        return cls._interned.setdefault(key, key)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and (self.graphdef, self.treedef) == (other.graphdef, other.treedef))

    def merge(self, weights):
        """The model (inside a trace) from the flat weights."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, weights))


def split_model(model) -> tuple[ModelDef, list]:
    """(structure, flat list of weight arrays) of an nnx model, as the compiled steps take it."""
    return split_state(*nnx.split(model))


def split_state(graphdef, state) -> tuple[ModelDef, list]:
    """`split_model` for a model already split by nnx (the planner's abstract one)."""
    leaves, treedef = jax.tree.flatten(state)
    return ModelDef.of(graphdef, treedef), leaves


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What each slot's decoding needs between dispatches, kept on the device."""

    tokens: jax.Array  # [S] int32: the token the slot feeds next (the last one it sampled)
    alive: jax.Array  # [S] bool: the slot generates in the steps it is packed into
    budget: jax.Array  # [S] int32: tokens it may still sample

    @classmethod
    def create(cls, slots: int, sharding) -> "SlotState":
        return cls(*(global_array(np.zeros(slots, dt), sharding) for dt in (np.int32, bool, np.int32)))

    @classmethod
    def abstract(cls, slots: int, sharding) -> "SlotState":
        return cls(*(jax.ShapeDtypeStruct((slots,), dt, sharding=sharding) for dt in (jnp.int32, jnp.bool_, jnp.int32)))


def _replicated(x):
    """Sampled tokens go to every device, so each host of a multi-host run can read them locally."""
    mesh = jax.sharding.get_abstract_mesh()
    return x if mesh.empty else jax.lax.with_sharding_constraint(x, P())


def _sample(logits, knobs, positions, mask):
    """Each row's next token with its own knobs (already gathered per row); `positions` are the
    drawn tokens' places in their sequences (they key the randomness)."""
    if mask is not None:
        logits = jnp.where(allowed_by_mask(mask, logits.shape[-1]), logits, -jnp.inf)
    keys = row_keys(knobs["seed"], positions)
    return sample(logits, keys, knobs["temperature"], knobs["top_k"], knobs["top_p"])


def _halted(tokens, halt_ids):
    """Whether each row's token is one of its halt ids ([rows, H], -1 padded)."""
    return jnp.any(tokens[:, None] == halt_ids, axis=1)


@functools.partial(jax.jit, static_argnames=("model_def", "impl"), donate_argnames=("cache", "state"))
def prefill_step(model_def: ModelDef, weights, cache: PagedCache, state: SlotState, tokens, slots, q_start,
                 n_valid, finish_budget, knobs, mask=None, *, impl: str):
    """Write R chunks into the cache and sample each row's next token.

    tokens [R, C]: row i continues slot slots[i] from position q_start[i] (its current length) with
    n_valid[i] real tokens. Padding rows (n_valid 0) must name slot `cache.slots` (out of range):
    they write only the discard page and change nothing. A row whose prompt ends in this chunk has
    finish_budget[i] >= 0, the tokens its slot may sample after this one: the slot starts decoding
    with the sampled token (alive unless that budget is 0 or the token halts it). Others pass -1.
    Returns (sampled tokens [R], last-token logits [R, V] float32, cache, state)."""
    model = model_def.merge(weights)
    batch = cache.chunk_batch(model.cfg, slots, q_start, n_valid, tokens.shape[1])
    h, cache = model.forward_cached(tokens, batch, cache, impl=impl)
    last = jnp.take_along_axis(h, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)
    ends = q_start + n_valid
    row_knobs = {k: jnp.take(v, slots, axis=0, mode="clip") for k, v in knobs.items()}
    sampled = _replicated(_sample(logits, row_knobs, ends, mask))
    finishing = finish_budget >= 0
    target = jnp.where(finishing, slots, cache.slots)  # rows that do not start decoding change no slot
    alive = finishing & (finish_budget > 0) & ~_halted(sampled, row_knobs["halt"])
    state = SlotState(tokens=state.tokens.at[target].set(sampled, mode="drop"),
                      alive=state.alive.at[target].set(alive, mode="drop"),
                      budget=state.budget.at[target].set(finish_budget, mode="drop"))
    lengths = cache.lengths.at[slots].set(ends, mode="drop")
    return sampled, logits, dataclasses.replace(cache, lengths=lengths), state


@functools.partial(jax.jit, static_argnames=("model_def", "max_steps", "impl", "want_logits"),
                   donate_argnames=("cache", "state"))
def decode_steps(model_def: ModelDef, weights, cache: PagedCache, state: SlotState, rows, n_steps, knobs, mask=None,
                 *, max_steps: int, impl: str, want_logits: bool = False):
    """Run up to `n_steps` (<= max_steps) decode steps for the slots rows[b] (`cache.slots` pads),
    feeding each alive row its token at its length and sampling the next; the block ends early
    once no row is alive.

    The step count is data, so one program per row count serves every block length (a `while`
    loop; its body is the model once). Returns (tokens [max_steps, B] int32, -1 where a row sampled
    nothing; the last step's logits [B, V] float32 if `want_logits` else None; cache; state).
    `mask` restricts row b's tokens to the ids whose bits are set in mask[b] (constrained rows run
    one step per dispatch, so it is one mask per row)."""
    model = model_def.merge(weights)
    n_slots, n_rows = cache.slots, rows.shape[0]
    slot = jnp.minimum(rows, n_slots - 1)
    row_knobs = {k: jnp.take(v, slot, axis=0) for k, v in knobs.items()}
    table = jnp.take(cache.page_table, slot, axis=0)

    def step(carry):
        i, pages, tokens, lengths, alive, budget, out, _ = carry
        batch = cache.rows_batch(model.cfg, table, lengths, alive)
        h, pages = model(tokens[:, None], batch, pages, impl=impl)
        logits = model.logits(h[:, 0])
        lengths = lengths + alive.astype(jnp.int32)
        drawn = _replicated(_sample(logits, row_knobs, lengths, mask))
        out = out.at[i].set(jnp.where(alive, drawn, -1))
        budget = budget - alive.astype(jnp.int32)
        tokens = jnp.where(alive, drawn, tokens)
        alive = alive & (budget > 0) & ~_halted(drawn, row_knobs["halt"])
        return i + 1, pages, tokens, lengths, alive, budget, out, (logits if want_logits else None)

    def more(carry):
        i, alive = carry[0], carry[4]
        return (i < jnp.minimum(n_steps, max_steps)) & jnp.any(alive)

    logits0 = jnp.zeros((n_rows, model.cfg.vocab_size), jnp.float32) if want_logits else None
    carry = (jnp.int32(0), cache.pages, jnp.take(state.tokens, slot), jnp.take(cache.lengths, slot),
             jnp.take(state.alive, slot) & (rows < n_slots), jnp.take(state.budget, slot),
             jnp.full((max_steps, n_rows), -1, jnp.int32), logits0)
    _, pages, tokens, lengths, alive, budget, out, logits = jax.lax.while_loop(more, step, carry)
    state = SlotState(tokens=state.tokens.at[rows].set(tokens, mode="drop"),
                      alive=state.alive.at[rows].set(alive, mode="drop"),
                      budget=state.budget.at[rows].set(budget, mode="drop"))
    cache = dataclasses.replace(cache, pages=pages, lengths=cache.lengths.at[rows].set(lengths, mode="drop"))
    return out, logits, cache, state


@functools.partial(jax.jit, static_argnames=("model_def", "impl"), donate_argnames=("cache", "state"))
def verify_step(model_def: ModelDef, weights, cache: PagedCache, state: SlotState, rows, drafts, n_draft, knobs, *,
                impl: str):
    """One step that may make several tokens per row: row b (slot rows[b], `cache.slots` pads)
    feeds its token and its first n_draft[b] draft tokens drafts[b] [B, K] at its length, draws
    the model's token after each of them exactly as `decode_steps` would (same knobs, same keys),
    and keeps the drawn tokens up to and including the first that differs from the draft. So a
    row's tokens are those of plain decoding whatever the drafts were; drafts only decide how
    many come out of one step. For a sampled row this is speculative sampling with a
    deterministic draft: a draft token x survives with probability p(x), and when it does not, the
    token drawn in its place is distributed as p without x, renormalized.

    Halt ids and budgets cut a row's run as they stop decode_steps; the cache length advances only
    by the tokens kept (rows written for rejected drafts lie past it and are overwritten later).
    No grammar mask: the scheduler verifies only while no row's next token is constrained. Returns
    (tokens [K+1, B] int32: row b's new tokens in order, -1 after them; cache; state)."""
    model = model_def.merge(weights)
    n_slots, width = cache.slots, drafts.shape[1] + 1
    slot = jnp.minimum(rows, n_slots - 1)
    row_knobs = {k: jnp.take(v, slot, axis=0) for k, v in knobs.items()}
    table = jnp.take(cache.page_table, slot, axis=0)
    alive = jnp.take(state.alive, slot) & (rows < n_slots)
    lengths, budget = jnp.take(cache.lengths, slot), jnp.take(state.budget, slot)
    # A row feeds no draft past the tokens it may still sample (nor past the context end, which
    # its budget already respects).
    n_draft = jnp.where(alive, jnp.clip(n_draft, 0, budget - 1), 0)
    fed = jnp.concatenate([jnp.take(state.tokens, slot)[:, None], drafts], axis=1)
    batch = cache.rows_batch(model.cfg, table, lengths, jnp.where(alive, 1 + n_draft, 0), width)
    h, pages = model(fed, batch, cache.pages, impl=impl)
    b = rows.shape[0]
    # The logits of all B x (K+1) tokens as one [rows, V] product, the shape decode_steps uses: on
    # XLA:CPU a 3-D product rounds differently in bf16, and a greedy row would then not always
    # draw the token decoding draws.
    logits = model.logits(h.reshape(b * width, -1))
    per_token = {k: jnp.repeat(v, width, axis=0) for k, v in row_knobs.items()}
    positions = (lengths[:, None] + 1 + jnp.arange(width, dtype=jnp.int32)[None, :]).reshape(-1)
    drawn = _replicated(_sample(logits, per_token, positions, None).reshape(b, width))
    # Kept: drawn[0 .. n-1] where n - 1 is the number of leading drafts the model drew itself,
    # cut after the first halt id and at the budget.
    j = jnp.arange(width - 1)[None, :]
    agrees = (drawn[:, :-1] == drafts) & (j < n_draft[:, None])
    accepted = jnp.sum(jnp.cumprod(agrees.astype(jnp.int32), axis=1), axis=1)
    halts = jnp.any(drawn[:, :, None] == row_knobs["halt"][:, None, :], axis=2)
    first_halt = jnp.where(jnp.any(halts, axis=1), jnp.argmax(halts, axis=1), width)
    n_out = jnp.where(alive, jnp.minimum(jnp.minimum(accepted, first_halt) + 1, budget), 0)
    out = jnp.where(jnp.arange(width)[None, :] < n_out[:, None], drawn, -1)
    last = jnp.take_along_axis(drawn, jnp.maximum(n_out - 1, 0)[:, None], axis=1)[:, 0]
    budget = budget - n_out
    still = alive & (budget > 0) & (first_halt >= n_out)
    state = SlotState(tokens=state.tokens.at[rows].set(jnp.where(alive, last, jnp.take(state.tokens, slot)),
                                                       mode="drop"),
                      alive=state.alive.at[rows].set(still, mode="drop"),
                      budget=state.budget.at[rows].set(budget, mode="drop"))
    cache = dataclasses.replace(cache, pages=pages, lengths=cache.lengths.at[rows].set(lengths + n_out, mode="drop"))
    return out.T, cache, state


@functools.partial(jax.jit, donate_argnames=("state",))
def resume_slots(state: SlotState, slots):
    """Re-arm slots a halt id stopped at a constraint's boundary (not at their end): they generate
    again from their last token with the budget they had. Slots out of range are ignored."""
    live = jnp.take(state.budget, slots, mode="clip") > 0
    return dataclasses.replace(state, alive=state.alive.at[slots].set(live, mode="drop"))


def compile_counts() -> dict[str, int]:
    """Programs compiled so far by each step function (tests assert that shapes, not prompts,
    decide this)."""
    return {"prefill": prefill_step._cache_size(), "decode": decode_steps._cache_size(),
            "verify": verify_step._cache_size()}
