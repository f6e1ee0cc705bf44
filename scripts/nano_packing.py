"""How kimi-k2-nano's training samples become cheap batches: sequence packing and a shared prefix.

Two facts make naive batches wasteful on a CPU. Most samples declare all nine builtin tools, as
`--tools builtin` does, so they begin with the same ~410-token prefix (the tool declarations and
the system prompt), while the part after it averages ~155 tokens; and samples vary in length, so
padding each to a common length wastes much of every batch. So a batch is:

  prefix  the shared prefix, once per batch: [P] tokens at positions 0..P-1
  rows    [B, W] tokens, each row several samples packed end to end. A sample that starts with
          the prefix is stored without it and placed at positions P, P+1, ...; its tokens attend
          to the prefix and to the earlier tokens of their own sample. Any other sample is stored
          whole at positions 0, 1, ... and attends to its own earlier tokens only.

`packed_forward` runs the model's own layers over this layout (the prefix flows through them once,
and every row reads its keys), giving for every sample exactly the logits the model gives it alone,
as a test checks. The prefix's gradient gathers every row's use of it. Per step this costs
P + B*W tokens instead of one padded 410 + ~155 for each prefixed sample.
"""

from __future__ import annotations

import numpy as np

# ---- host side: which samples share the prefix, and how they fill rows ----------------------------


def shared_prefix(tokenizer, template, tool_specs) -> np.ndarray:
    """The tokens every sample declaring `tool_specs` begins with: the declarations and the default
    system prompt, as the chat template renders them before the first user message."""
    from kimi_jax.chat.prompt import encode_chat

    return np.asarray(encode_chat(tokenizer, template, [], tool_specs, add_generation_prompt=False), np.int32)


def split_samples(tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, prefix: np.ndarray, width: int):
    """(starts, lengths, shared, dropped): where each sample's stored part begins in the flat
    `tokens`, its length, and whether it continues the prefix (then the prefix is skipped); samples
    whose stored part exceeds `width` are dropped (counted)."""
    p = len(prefix)
    starts, lengths, shared = [], [], []
    dropped = 0
    for a, b in zip(offsets[:-1], offsets[1:]):
        uses = b - a > p and np.array_equal(tokens[a:a + p], prefix)
        start = a + p if uses else a
        if b - start > width:
            dropped += 1
            continue
        starts.append(start)
        lengths.append(b - start)
        shared.append(uses)
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int32), np.asarray(shared, bool), dropped


def pack_rows(lengths: np.ndarray, width: int, order: np.ndarray, open_rows: int = 16) -> list[list[int]]:
    """Samples (indices in `order`'s order) into rows of at most `width` tokens, first fit among the
    `open_rows` most recent rows: nearly full rows while keeping the shuffled order's randomness."""
    rows: list[list[int]] = []
    room: list[int] = []
    first_open = 0
    for i in order:
        n = int(lengths[i])
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(int(i))
                room[r] -= n
                break
        else:
            rows.append([int(i)])
            room.append(width - n)
            first_open = max(first_open, len(rows) - open_rows)
    return rows


class PackedBatches:
    """Batches of `batch` packed rows of `width` tokens over epochs. Each epoch shuffles the samples
    and packs them afresh, a pure function of (seed, epoch), so `position` (epoch, batch) is all a
    resumed run needs to continue exactly."""

    def __init__(self, tokens, mask, offsets, prefix, width: int, batch: int, seed: int, position=(0, 0),
                 shuffle: bool = True):
        self.tokens, self.mask, self.prefix = tokens, mask, np.asarray(prefix, np.int32)
        self.width, self.batch, self.seed, self.shuffle = width, batch, seed, shuffle
        self.starts, self.lengths, self.shared, self.dropped = split_samples(tokens, mask, offsets, self.prefix, width)
        if not len(self.lengths):
            raise ValueError(f"no sample fits in rows of {width} tokens")
        self.epoch, self.index = position
        self.plan = self._plan(self.epoch)
        if not self.plan:
            raise ValueError(f"{len(self.lengths)} samples fill fewer rows than one batch of {batch}")

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        order = np.arange(len(self.lengths))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        rows = pack_rows(self.lengths, self.width, order)
        return [rows[i:i + self.batch] for i in range(0, len(rows) - self.batch + 1, self.batch)]

    @property
    def position(self):
        return [self.epoch, self.index]

    @property
    def fill(self) -> float:
        """Share of row tokens that hold sample tokens (the rest is padding), this epoch."""
        used = sum(int(self.lengths[i]) for b in self.plan for row in b for i in row)
        return used / (len(self.plan) * self.batch * self.width)

    def next(self) -> dict:
        if self.index >= len(self.plan):
            self.epoch, self.index = self.epoch + 1, 0
            self.plan = self._plan(self.epoch)
        rows = self.plan[self.index]
        self.index += 1
        return self.arrays(rows)

    def arrays(self, rows: list[list[int]]) -> dict:
        """One batch as arrays: tokens, loss mask, positions, segment ids (1, 2, ... per sample in
        a row; 0 is padding) and whether each token's sample sees the prefix."""
        shape = (len(rows), self.width)
        out = {"tokens": np.zeros(shape, np.int32), "mask": np.zeros(shape, np.float32),
               "positions": np.zeros(shape, np.int32), "segments": np.zeros(shape, np.int32),
               "shared": np.zeros(shape, bool), "prefix": self.prefix}
        p = len(self.prefix)
        for r, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row, start=1):
                a, n = int(self.starts[i]), int(self.lengths[i])
                span = slice(at, at + n)
                out["tokens"][r, span] = self.tokens[a:a + n]
                out["mask"][r, span] = self.mask[a:a + n]
                out["positions"][r, span] = np.arange(n) + (p if self.shared[i] else 0)
                out["segments"][r, span] = s
                out["shared"][r, span] = self.shared[i]
                at += n
        return out


# ---- device side: the model's layers over the packed layout -----------------------------------------


def _attend(q_lat, q_pe, keys, masks, scale):
    """Absorbed MLA attention (kimi_jax/mla.py) of queries [b,c,h,r]/[b,c,h,p] over several key sets,
    each (cache rows [b or 1, s, r+p]) with its visibility [b, c, s], softmax taken over all."""
    import jax
    import jax.numpy as jnp

    r = q_lat.shape[-1]
    scores = []
    for rows, visible in zip(keys, masks):
        rows = jnp.broadcast_to(rows, (q_lat.shape[0], *rows.shape[1:]))
        s = (jnp.einsum("bchr,bsr->bchs", q_lat, rows[..., :r]) +
             jnp.einsum("bchp,bsp->bchs", q_pe, rows[..., r:])) * scale
        scores.append(jnp.where(visible[:, :, None, :], s, -jnp.inf))
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    values = jnp.concatenate([jnp.broadcast_to(rows, (q_lat.shape[0], *rows.shape[1:]))[..., :r] for rows in keys],
                             axis=1)
    return jnp.einsum("bchs,bsr->bchr", p, values)


def packed_forward(model, prefix, tokens, positions, segments, shared, impl: str | None = None):
    """Logits [B, W, vocab] (float32) of every row token: `model`'s layers over one batch of
    `PackedBatches.arrays` (prefix [P]; tokens, positions, segments, shared [B, W]). `impl` names
    the expert kernels (default: the backend's best, as in `KimiK2.forward_no_cache`)."""
    import jax.numpy as jnp

    from kimi_jax import rope
    from kimi_jax.layers import rms_norm
    from kimi_jax.model import default_impl
    from kimi_jax.moe import MoE

    impl = impl or default_impl()
    cfg = model.cfg
    eps, scale = cfg.rms_norm_eps, rope.softmax_scale(cfg)
    b, w = tokens.shape
    p = prefix.shape[0]
    embed = model.embed[...]
    xp, x = jnp.take(embed, prefix, axis=0)[None], jnp.take(embed, tokens, axis=0)
    cos_p, sin_p = rope.rope_angles(cfg, jnp.arange(p, dtype=jnp.int32)[None])
    cos, sin = rope.rope_angles(cfg, positions)
    causal = jnp.arange(w)[:, None] >= jnp.arange(w)[None, :]
    # Own sample's earlier tokens; padding (segment 0) sees itself so its softmax stays finite.
    own = ((segments[:, :, None] == segments[:, None, :]) & causal[None]) | jnp.eye(w, dtype=bool)[None]
    sees_prefix = jnp.broadcast_to(shared[:, :, None], (b, w, p))
    prefix_causal = (jnp.arange(p)[:, None] >= jnp.arange(p)[None, :])[None]
    for layer in model.layers:
        attn = layer.attn
        ql_p, qpe_p, rows_p = attn.project(rms_norm(xp, layer.input_norm[...], eps), cos_p, sin_p)
        ql, qpe, rows = attn.project(rms_norm(x, layer.input_norm[...], eps), cos, sin)
        xp = xp + attn.output(_attend(ql_p, qpe_p, [rows_p], [prefix_causal], scale))
        x = x + attn.output(_attend(ql, qpe, [rows_p, rows], [sees_prefix, own], scale))
        # One FFN call over the prefix and the rows together (one expert dispatch, not two).
        h = rms_norm(jnp.concatenate([xp.reshape(p, -1), x.reshape(b * w, -1)]), layer.post_attention_norm[...], eps)
        y = layer.mlp(h, impl) if isinstance(layer.mlp, MoE) else layer.mlp(h)
        xp, x = xp + y[:p].reshape(xp.shape), x + y[p:].reshape(x.shape)
    return model.logits(x)
