"""Routed mixture of experts with a shared expert (docs/k2-format.md §4.6).

Routing: sigmoid scores; `e_score_correction_bias` is added only to *choose* experts (optionally
within the best `topk_group` of `n_group` groups); the mixing weights come from the unbiased scores,
normalized over the chosen k and multiplied by `routed_scaling_factor`.

Dispatch: the t·k (token, expert) assignments are sorted by expert so each expert sees one
contiguous run of rows; `expert_ffn` then runs one grouped matmul per projection over those runs.
No token is dropped and no expert computes rows it was not chosen for. `expert_ffn` is the single
place that knows how expert weights are stored (dense arrays or packed INT4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax.config import Config
from kimi_jax.layers import INIT_STD, MLP, param
from kimi_jax.quant import Int4Weight
from kimi_jax.sharding import spec_for


def route(x: jax.Array, router: jax.Array, bias: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x [t,d] -> (weights [t,k] float32, expert ids [t,k] int32)."""
    logits = jnp.einsum("td,ed->te", x.astype(jnp.float32), router.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        t = choice.shape[0]
        grouped = choice.reshape(t, cfg.n_group, -1)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [t, n_group]: sum of each group's best 2
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        group_mask = jnp.zeros_like(group_score, dtype=bool).at[jnp.arange(t)[:, None], keep].set(True)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(t, -1)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def _row_blocks(group_sizes: jax.Array, m: int, bm: int):
    """Lay rows sorted by group out in blocks of `bm` rows that each belong to one group.

    Returns (slot of each row in the padded layout, group of each block, number of blocks). The
    block count is static: at most m rows plus bm-1 padding rows for each group that has rows.
    Rows past sum(group_sizes) belong to no group and all land on one spare slot after the blocks."""
    e = group_sizes.shape[0]
    padded = (group_sizes + bm - 1) // bm * bm
    pad_end = jnp.cumsum(padded)
    end = jnp.cumsum(group_sizes)
    n_blocks = -(-(m + min(e, m) * (bm - 1)) // bm)
    rows = jnp.arange(m)
    g = jnp.minimum(jnp.searchsorted(end, rows, side="right"), e - 1)
    slot = jnp.where(rows < end[-1], (pad_end - padded)[g] + rows - (end - group_sizes)[g], n_blocks * bm)
    block_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_blocks) * bm, side="right"), e - 1)
    return slot, block_group, n_blocks


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Row i of x (sorted by group) times its group's matrix: x [m,k], w [g,n,k] ([out, in]) -> [m,n].

    TPU and GPU implement `ragged_dot` as a true grouped matmul. XLA:CPU lowers it to a dense
    product of every row with every group (g times the work), so there we gather only the groups
    in use, one per block of rows, and run a batched matmul."""
    if jax.default_backend() != "cpu":
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
        return jax.lax.ragged_dot_general(x, w, group_sizes, dims)
    m, g = x.shape[0], w.shape[0]
    bm = max(1, min(64, 1 << max(0, (m // g).bit_length() - 1)))  # ~ rows per group, power of two
    slot, block_group, n_blocks = _row_blocks(group_sizes, m, bm)
    xp = jnp.zeros((n_blocks * bm + 1, x.shape[1]), x.dtype).at[slot].set(x)[:-1].reshape(n_blocks, bm, -1)
    y = jnp.einsum("bmk,bnk->bmn", xp, w[block_group])
    return jnp.concatenate([y.reshape(n_blocks * bm, -1), jnp.zeros_like(y[0, :1])])[slot]


def expert_ffn(xs: jax.Array, gate, up, down, group_sizes: jax.Array) -> jax.Array:
    """SwiGLU of each row through its expert. xs [m,d] sorted by expert, group_sizes [e] -> [m,d].

    Experts are stored [out, in] per expert, as the checkpoint does: gate/up [e,f,d], down [e,d,f],
    dense or as `Int4Weight`s (packed [e, out, in/8]) that go through kernels_pallas.ops, which
    picks the Pallas kernel for the backend or the XLA reference. Each layer owns its experts'
    arrays, so the kernels read only the chosen experts' rows and nothing slices a layer out first.
    """
    if isinstance(gate, Int4Weight):
        from kernels_pallas import ops

        h = ops.grouped_int4_swiglu(xs, gate.packed, gate.scale, up.packed, up.scale, group_sizes)
        return ops.grouped_int4_matmul(h.astype(xs.dtype), down.packed, down.scale, group_sizes)
    g = grouped_matmul(xs, gate, group_sizes)
    u = grouped_matmul(xs, up, group_sizes)
    return grouped_matmul(jax.nn.silu(g) * u, down, group_sizes)


def dispatch(x: jax.Array, weights: jax.Array, idx: jax.Array, n_experts: int, ffn, expert_offset=0) -> jax.Array:
    """Sort assignments by expert, run `ffn(xs, group_sizes)`, and combine back. x [t,d] -> [t,d].

    Only experts [expert_offset, expert_offset + n_experts) are computed here (one shard's experts
    under expert parallelism); assignments to other experts are sorted last, left out of
    `group_sizes`, and contribute nothing."""
    t, k = idx.shape
    local = idx - expert_offset
    mine = (local >= 0) & (local < n_experts)
    key = jnp.where(mine, local, n_experts).reshape(-1)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    ys = ffn(x[order // k], group_sizes)  # [t*k, d] in expert order; rows of other shards: garbage
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)
    y = jnp.where(mine[..., None], y.astype(jnp.float32), 0.0)  # where, not *0: garbage may be NaN
    return jnp.einsum("tkd,tk->td", y, weights).astype(x.dtype)


def random_int4(rngs: nnx.Rngs, shape_out_in, group: int, dtype, axes) -> nnx.Param:
    """Random packed INT4 weights of logical shape [..., out, in] (tests, abstract shapes).

    Built directly in the packed domain (random nibbles, random positive scales) so it also works
    under `nnx.eval_shape`, where no host quantizer can run."""
    *lead, n_out, n_in = shape_out_in
    packed = jax.random.bits(rngs.params(), (*lead, n_out, n_in // 8), jnp.uint32).view(jnp.int32)
    # Nibbles are uniform on [-8, 7] (std ~4.6): pick scales so weights have std ~INIT_STD.
    u = jax.random.uniform(rngs.params(), (*lead, n_out, n_in // group), jnp.float32, 0.5, 1.5)
    scale = (u * INIT_STD / 4.6).astype(dtype)
    return nnx.Param(Int4Weight(packed, scale, n_in), axes=axes)


class MoE(nnx.Module):
    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        self.cfg = cfg
        self.router = param(rngs, (e, d), ("experts_logits", "embed"), dtype)
        self.router_bias = nnx.Param(jnp.zeros((e,), jnp.float32), axes=("experts_logits",))
        if cfg.quantization is None:
            self.gate_proj = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), dtype)
            self.up_proj = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), dtype)
            self.down_proj = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dtype)
        else:
            # Scales are bf16 as K2 ships them, whatever the compute dtype (the loader keeps a
            # checkpoint's own scale dtype).
            g, sdt = cfg.quantization.group_size, jnp.bfloat16
            self.gate_proj = random_int4(rngs, (e, f, d), g, sdt, ("experts", "expert_mlp", "embed"))
            self.up_proj = random_int4(rngs, (e, f, d), g, sdt, ("experts", "expert_mlp", "embed"))
            self.down_proj = random_int4(rngs, (e, d, f), g, sdt, ("experts", "embed", "expert_mlp"))
        self.shared = MLP(d, f * cfg.n_shared_experts, dtype, rngs) if cfg.n_shared_experts else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> [..., d]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        with jax.named_scope("router"):
            w, idx = route(x, self.router[...], self.router_bias[...], self.cfg)
        mesh = jax.sharding.get_abstract_mesh()
        with jax.named_scope("routed_experts"):
            y = self._experts(x, w, idx) if mesh.empty else self._experts_sharded(x, w, idx, mesh)
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                y = y + self.shared(x)
        return y.reshape(shape)

    def _experts(self, x, w, idx, expert_offset=0, weights=None):
        gate, up, down = weights or (self.gate_proj.get_value(), self.up_proj.get_value(), self.down_proj.get_value())
        n = _stored_shape(gate)[0]
        return dispatch(x, w, idx, n, lambda xs, gs: expert_ffn(xs, gate, up, down, gs), expert_offset)

    def _experts_sharded(self, x, w, idx, mesh):
        """Expert parallelism made explicit: every device holds its experts' weights (and its slice
        of their hidden units when `tensor` > 1) and the tokens of its data shard; it computes its
        experts' share of each token and one psum over (expert, tensor) adds the shares up.
        Chosen over an all-to-all token exchange for simplicity; see README for the trade-off."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)

        def spec(var):
            value = var.get_value()
            s = spec_for(tuple(var.get_metadata()["axes"]), _stored_shape(value), mesh, name="experts")
            return Int4Weight(s, s, value.in_features) if isinstance(value, Int4Weight) else s

        def body(x, w, idx, gate, up, down):
            offset = jax.lax.axis_index("expert") * _stored_shape(gate)[0]
            y = self._experts(x, w, idx, offset, (gate, up, down))
            return jax.lax.psum(y, ("expert", "tensor"))

        rows = P("data") if x.shape[0] % mesh.shape["data"] == 0 else P()
        return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, *map(spec, projections)),
                             out_specs=rows, check_vma=False)(x, w, idx, *(v.get_value() for v in projections))


def _stored_shape(weights) -> tuple[int, ...]:
    """Shape of an expert weight as stored (an `Int4Weight`'s packed array)."""
    return (weights.packed if isinstance(weights, Int4Weight) else weights).shape
