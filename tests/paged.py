"""Driving the compiled steps directly, one cache row per prompt: what the parity tests compare
(logits through the paged cache) without the scheduler in between."""

import contextlib

import jax
import numpy as np

from kimi_jax.cache import PagedCache
from kimi_jax.pages import pages_for
from kimi_jax.sampling import SamplingParams, knob_arrays
from kimi_jax.steps import SlotState, decode_steps, prefill_step, split_model


class Rows:
    """A fresh paged cache with one slot per prompt; pages handed out in a scrambled order so that
    a sequence's pages are never contiguous."""

    def __init__(self, model, n_rows: int, max_len: int, *, page_size: int = 4, mesh=None, seed: int = 0,
                 impl: str = "xla"):
        self.model_def, self.weights = split_model(model)
        self.mesh, self.impl = mesh, impl
        per = pages_for(max_len, page_size)
        shards = mesh.shape["data"] if mesh is not None else 1
        n_pages = -(-(1 + n_rows * per) // shards) * shards
        self.cache = PagedCache.create(model.cfg, slots=n_rows, max_len=max_len, page_size=page_size,
                                       n_pages=n_pages, dtype=model.dtype, mesh=mesh)
        pages = 1 + np.random.default_rng(seed).permutation(n_rows * per)
        self.table = pages.reshape(n_rows, per).astype(np.int32)
        self.cache = self.cache.with_table(self.table)
        self.state = SlotState.create(n_rows, self.cache.lengths.sharding)
        self.knobs = knob_arrays([SamplingParams()] * n_rows)
        self.n_rows, self.max_len = n_rows, max_len
        self.lengths = np.zeros(n_rows, np.int32)

    def _ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def prefill(self, prompts, chunk: int) -> np.ndarray:
        """Append each row's prompt (rows given by position) in chunks; last-token logits [n, V]."""
        n = self.n_rows
        width = max(len(p) for p in prompts)
        out = [None] * n
        for c0 in range(0, width, chunk):
            tokens = np.zeros((n, chunk), np.int32)
            slots = np.full(n, n, np.int32)
            n_valid = np.zeros(n, np.int32)
            for b, p in enumerate(prompts):
                part = p[c0:c0 + chunk]
                if part:
                    tokens[b, :len(part)] = part
                    slots[b], n_valid[b] = b, len(part)
            with self._ctx():
                _, logits, self.cache, self.state = prefill_step(
                    self.model_def, self.weights, self.cache, self.state, tokens, slots, self.lengths.copy(), n_valid,
                    np.full(n, self.max_len, np.int32), self.knobs, impl=self.impl)
            logits = np.asarray(logits)
            for b in range(n):
                if n_valid[b] and c0 + n_valid[b] == len(prompts[b]):
                    out[b] = logits[b]
            self.lengths += n_valid
        return np.stack(out)

    def decode(self, tokens) -> np.ndarray:
        """Feed one token per row; the next-token logits [n, V]."""
        with self._ctx():
            self.state.tokens = jax.device_put(np.asarray(tokens, np.int32), self.state.tokens.sharding)  # the caller's tokens
            _, logits, self.cache, self.state = decode_steps(
                self.model_def, self.weights, self.cache, self.state, np.arange(self.n_rows, dtype=np.int32),
                np.int32(1), self.knobs, max_steps=1, impl=self.impl, want_logits=True)
        self.lengths += 1
        return np.asarray(logits)

    def latents(self, row: int, n: int) -> np.ndarray:
        """The first n cached rows [layers, n, r + p] of a row's sequence, read through its pages."""
        ps = self.cache.page_size
        pos = np.arange(n)
        pages = self.table[row, pos // ps]
        return np.stack([np.asarray(p)[pages, pos % ps] for p in self.cache.pages])
