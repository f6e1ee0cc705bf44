"""The inference engine: jitted prefill and decode over the latent cache, and the generation loop.

The engine sees token ids only (chat formatting lives in kimi_jax.chat and kimi_jax.agent).

Two compiled programs serve any prompt and any number of steps:
  prefill — one chunk of `chunk` tokens per row; prompts of any length run as several chunks of the
            same shape, the last one partly padding (`n_valid` says how much is real);
  decode  — one token per row, sampling inside, cache donated and updated in place.
Prompts of a batch are right-aligned (see cache.py), so a batch of different lengths is still one
chunk shape and one decode shape: nothing recompiles between prompts or steps.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kimi_jax.cache import LatentCache
from kimi_jax.distributed import to_host
from kimi_jax.errors import KimiError
from kimi_jax.model import DEFAULT_KV_BLOCK, KimiK2
from kimi_jax.sampling import SamplingParams, sample


class Engine:
    def __init__(self, model: KimiK2, *, max_len: int = 4096, chunk: int = 128, block: int = DEFAULT_KV_BLOCK,
                 pad_id: int = 0, mesh=None):
        self.cfg = model.cfg
        self.dtype = model.dtype
        self.max_len = max_len
        self.chunk = chunk
        self.block = min(block, -(-(max_len + chunk - 1) // 8) * 8)  # tiny caches need no big blocks
        self.slots = LatentCache.slots_for(max_len, chunk, self.block)
        self.pad_id = pad_id
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self._jitted = {
            "prefill": jax.jit(self._prefill_chunk, donate_argnums=(2,)),
            "decode": jax.jit(self._decode_step, donate_argnums=(2,)),
        }
        self._prefill = self._on_mesh(self._jitted["prefill"])
        self._decode = self._on_mesh(self._jitted["decode"])
        # A per-engine function object: jax.jit shares compiled programs between wrappers of the
        # same function, which would blur compile_counts() across engines.
        self._jitted["sample"] = jax.jit(lambda logits, key, knobs: self._replicated(sample(logits, key, **knobs)))
        self._sample = self._on_mesh(self._jitted["sample"])

    def _on_mesh(self, fn):
        """Trace and run `fn` with the engine's mesh as the context mesh (the MoE reads it to lay
        out its shard_map); without a mesh, call it as is."""
        if self.mesh is None:
            return fn

        def call(*args):
            with jax.set_mesh(self.mesh):
                return fn(*args)

        return call

    # ---- compiled steps -----------------------------------------------------------------------
    def _prefill_chunk(self, state, tokens, cache, n_valid):
        model = nnx.merge(self.graphdef, state)
        h, cache = model(tokens, cache, n_valid, block=self.block)
        last = jax.lax.dynamic_index_in_dim(h, n_valid - 1, axis=1, keepdims=False)
        return model.logits(last), cache

    def _decode_step(self, state, tokens, cache, key, step, knobs):
        """One token per row: forward, sample with the step's key (folded in here, not on the host,
        so a step is a single dispatch), and the cache updated in place."""
        model = nnx.merge(self.graphdef, state)
        h, cache = model(tokens[:, None], cache, block=self.block)
        logits = model.logits(h[:, 0])
        return self._replicated(sample(logits, jax.random.fold_in(key, step), **knobs)), logits, cache

    def _replicated(self, tokens):
        """Sampled tokens go to every device, so each host of a multi-host run can read them."""
        if self.mesh is None:
            return tokens
        return jax.lax.with_sharding_constraint(tokens, NamedSharding(self.mesh, PartitionSpec()))

    # ---- cache and prefill --------------------------------------------------------------------
    def new_cache(self, lengths: Sequence[int]) -> LatentCache:
        """An empty cache for rows whose prompts have these lengths (right-aligned)."""
        longest = max(lengths)
        return LatentCache.create(self.cfg, [longest - n for n in lengths], self.slots, self.dtype, self.mesh)

    def prefill(self, prompts: Sequence[Sequence[int]], cache: LatentCache | None = None):
        """Write prompts into `cache` (a new one when None) and return (last-token logits [b, v], cache).

        With an existing cache every row must append the same number of tokens; a new cache takes
        prompts of any lengths."""
        lengths = [len(p) for p in prompts]
        data = self.mesh.shape["data"] if self.mesh is not None else 1
        if len(prompts) % data:
            raise KimiError(f"a batch of {len(prompts)} prompts cannot be split over the mesh's data axis of "
                            f"size {data}")
        if min(lengths) == 0:
            raise KimiError("empty prompt: give at least one token")
        start = 0 if cache is None else int(to_host(cache.length))
        if cache is None:
            cache = self.new_cache(lengths)
        elif len(set(lengths)) != 1 or len(prompts) != cache.batch:
            raise KimiError("extending a cache needs one equal-length token list per cached row")
        total = start + max(lengths)
        if total > self.max_len:
            raise KimiError(f"prompt needs {total} tokens but the cache holds {self.max_len} (raise --max-len)")
        width = max(lengths)
        tokens = np.full((len(prompts), -(-width // self.chunk) * self.chunk), self.pad_id, np.int32)
        for row, p in enumerate(prompts):
            tokens[row, width - len(p):width] = p
        logits = None
        for c0 in range(0, width, self.chunk):
            n_valid = min(self.chunk, width - c0)
            # host numpy inputs: on a multi-host mesh every process passes the same values
            logits, cache = self._prefill(self.state, tokens[:, c0:c0 + self.chunk], cache, np.int32(n_valid))
        return logits, cache

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 cache: LatentCache | None = None) -> "Generation":
        """Start generating; iterate the result to step it (see `Generation`)."""
        return Generation(self, prompts, sampling, cache)

    def compile_counts(self) -> dict[str, int]:
        """How many programs each jitted step has compiled (tests assert this stays at one)."""
        return {name: f._cache_size() for name, f in self._jitted.items()}


class Generation:
    """A running generation. Iterating yields each step's new tokens (np.int32 [b]); afterwards
    `tokens`, `finish_reasons`, `cache` and `cached_len` describe the result.

    The cache ends up holding the prompt and every generated token that was fed back, including a
    stop token (one decode step is dispatched ahead of the host's stop check, which also writes the
    stop token's latents) — so an agent can append the next turn to it directly."""

    def __init__(self, engine: Engine, prompts, sampling: SamplingParams, cache: LatentCache | None):
        self.engine = engine
        self.sampling = sampling
        self.batch = len(prompts)
        t0 = time.perf_counter()
        logits, self.cache = engine.prefill(prompts, cache)
        self.cached_len = int(to_host(self.cache.length))
        self._knobs = sampling.arrays(self.batch)
        self._key = jax.random.key(sampling.seed)
        self._next = engine._sample(logits, jax.random.fold_in(self._key, 0), self._knobs)
        self._next.block_until_ready()
        self.prefill_seconds = time.perf_counter() - t0
        self.decode_seconds = 0.0
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * self.batch
        self.last_logits = logits

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def stop(self, reason: str = "cancelled") -> None:
        self.finish_reasons = [r or reason for r in self.finish_reasons]

    def __iter__(self):
        eng, sp = self.engine, self.sampling
        stops = np.asarray(sp.stop_ids, np.int32)
        step = 0
        t0 = time.perf_counter()
        while not self.done:
            current = self._next
            room = self.cached_len < eng.max_len
            if room:  # dispatch the next step before waiting for this one's tokens on the host
                self._next, self.last_logits, self.cache = eng._decode(
                    eng.state, current, self.cache, self._key, np.int32(step + 1), self._knobs)
            host = to_host(current)
            for b, tok in enumerate(host):
                if self.finish_reasons[b] is None:
                    self.tokens[b].append(int(tok))
                    if tok in stops:
                        self.finish_reasons[b] = "stop"
                    elif len(self.tokens[b]) >= sp.max_new_tokens or not room:
                        self.finish_reasons[b] = "length"
            if room:
                self.cached_len += 1
            step += 1
            yield host
        self.decode_seconds += time.perf_counter() - t0

    def run(self) -> "Generation":
        for _ in self:
            pass
        return self
