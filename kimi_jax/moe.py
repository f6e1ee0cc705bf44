"""Routed mixture of experts with a shared expert (docs/k2-format.md §4.6).

Routing: sigmoid scores; `e_score_correction_bias` is added only to *choose* experts (optionally
within the best `topk_group` of `n_group` groups); the mixing weights come from the unbiased scores,
normalized over the chosen k and multiplied by `routed_scaling_factor`.

Under `nnx.capture(..., nnx.Intermediate)` each MoE layer records its routing as the intermediate
`ROUTING`: {"expert_ids" [t,k], "weights" [t,k], "scores" [t,e] (the unbiased sigmoid affinities)};
`kimi_jax.router_choices` collects them for a prompt.

Dispatch: the t·k (token, expert) assignments are sorted by expert so each expert sees one
contiguous run of rows; `expert_ffn` then runs one grouped matmul per projection over those runs
(kernels_pallas.ops: Pallas INT4 kernels, `ragged_dot`, or the CPU row-block reference).
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
from kimi_jax.quant import Int4Weight, packing_axes, random_int4
from kimi_jax.sharding import spec_for

ROUTING = "routing"  # name of the intermediate each MoE layer sows under nnx.capture


def router_scores(x: jax.Array, router: jax.Array) -> jax.Array:
    """x [t,d] -> every token's sigmoid affinity for every routed expert, [t,e] float32."""
    logits = jnp.einsum("td,ed->te", x.astype(jnp.float32), router.astype(jnp.float32))
    return jax.nn.sigmoid(logits)


def select_experts(scores: jax.Array, bias: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Affinities [t,e] -> (mixing weights [t,k] float32, expert ids [t,k] int32)."""
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


def route(x: jax.Array, router: jax.Array, bias: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x [t,d] -> (weights [t,k] float32, expert ids [t,k] int32)."""
    return select_experts(router_scores(x, router), bias, cfg)


def expert_ffn(xs: jax.Array, gate, up, down, group_sizes: jax.Array, impl: str) -> jax.Array:
    """SwiGLU of each row through its expert. xs [m,d] sorted by expert, group_sizes [e] -> [m,d].

    Experts are stored [out, in] per expert, as the checkpoint does: gate/up [e,f,d], down [e,d,f],
    dense or as `Int4Weight`s (packed [e, out, in/8]); kernels_pallas.ops runs `impl`'s kernels
    (or the XLA reference). Each layer owns its experts' arrays, so the kernels read only the chosen
    experts' rows and nothing slices a layer out first.
    """
    from kernels_pallas import ops

    if isinstance(gate, Int4Weight):
        h = ops.grouped_int4_swiglu(xs, gate.packed, gate.scale, up.packed, up.scale, group_sizes, impl=impl,
                                    packing=gate.packing)
        return ops.grouped_int4_matmul(h.astype(xs.dtype), down.packed, down.scale, group_sizes, impl=impl,
                                       packing=down.packing)
    g = ops.grouped_matmul(xs, gate, group_sizes, impl=impl)
    u = ops.grouped_matmul(xs, up, group_sizes, impl=impl)
    return ops.grouped_matmul(jax.nn.silu(g) * u, down, group_sizes, impl=impl)


def dispatch(x: jax.Array, weights: jax.Array, idx: jax.Array, n_experts: int, ffn, expert_offset=0,
             valid: jax.Array | None = None) -> jax.Array:
    """Sort assignments by expert, run `ffn(xs, group_sizes)`, and combine back. x [t,d] -> [t,d].

    Only experts [expert_offset, expert_offset + n_experts) are computed here (one shard's experts
    under expert parallelism), and only for tokens that are `valid` [t] (padding, idle decode
    rows: no expert weight is read for them; their routed output is 0). Other assignments are
    sorted last, left out of `group_sizes`, and contribute nothing."""
    t, k = idx.shape
    local = idx - expert_offset
    mine = (local >= 0) & (local < n_experts)
    if valid is not None:
        mine = mine & valid[:, None]
    key = jnp.where(mine, local, n_experts).reshape(-1)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    ys = ffn(x[order // k], group_sizes)  # [t*k, d] in expert order; rows of other shards: garbage
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)
    y = jnp.where(mine[..., None], y.astype(jnp.float32), 0.0)  # where, not *0: garbage may be NaN
    return jnp.einsum("tkd,tk->td", y, weights).astype(x.dtype)


class MoE(nnx.Module):
    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs, expert_packing: str = "ct"):
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
            def experts(shape, axes):
                weight = random_int4(rngs.params(), shape, cfg.quantization.group_size, jnp.bfloat16, INIT_STD,
                                     expert_packing)
                return nnx.Param(weight, axes=packing_axes(axes, expert_packing))

            self.gate_proj = experts((e, f, d), ("experts", "expert_mlp", "embed"))
            self.up_proj = experts((e, f, d), ("experts", "expert_mlp", "embed"))
            self.down_proj = experts((e, d, f), ("experts", "embed", "expert_mlp"))
        self.shared = MLP(d, f * cfg.n_shared_experts, dtype, rngs) if cfg.n_shared_experts else None

    def __call__(self, x: jax.Array, impl: str, valid: jax.Array | None = None) -> jax.Array:
        """x [..., d] -> [..., d]; `impl` picks the expert kernels (kernels_pallas.ops). `valid`
        [...] marks real tokens: the others take no expert (None: every token is real)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        valid = None if valid is None else valid.reshape(-1)
        with jax.named_scope("router"):
            scores = router_scores(x, self.router[...])
            w, idx = select_experts(scores, self.router_bias[...], self.cfg)
        if _capturing(self):
            self.sow(nnx.Intermediate, ROUTING, {"expert_ids": idx, "weights": w, "scores": scores})
        mesh = jax.sharding.get_abstract_mesh()
        with jax.named_scope("routed_experts"):
            y = self._experts(x, w, idx, valid, impl) if mesh.empty else \
                self._experts_sharded(x, w, idx, valid, impl, mesh)
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                y = y + self.shared(x)
        return y.reshape(shape)

    def _experts(self, x, w, idx, valid, impl, expert_offset=0, weights=None):
        gate, up, down = weights or (self.gate_proj.get_value(), self.up_proj.get_value(), self.down_proj.get_value())
        n = _stored_shape(gate)[0]
        return dispatch(x, w, idx, n, lambda xs, gs: expert_ffn(xs, gate, up, down, gs, impl), expert_offset,
                        valid)

    def _experts_sharded(self, x, w, idx, valid, impl, mesh):
        """Expert parallelism made explicit: every device holds its experts' weights (and its slice
        of their hidden units when `tensor` > 1) and the tokens of its data shard; it computes its
        experts' share of each token and one psum over (expert, tensor) adds the shares up.
        Chosen over an all-to-all token exchange for simplicity; see README for the trade-off."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)

        def spec(var):
            value = var.get_value()
            s = spec_for(tuple(var.get_metadata()["axes"]), _stored_shape(value), mesh, name="experts")
            return Int4Weight(s, s, value.in_features, value.packing) if isinstance(value, Int4Weight) else s

        def body(x, w, idx, valid, gate, up, down):
            offset = jax.lax.axis_index("expert") * _stored_shape(gate)[0]
            y = self._experts(x, w, idx, valid, impl, offset, (gate, up, down))
            return jax.lax.psum(y, ("expert", "tensor"))

        rows = P("data") if x.shape[0] % mesh.shape["data"] == 0 else P()
        valid = jnp.ones(x.shape[:1], bool) if valid is None else valid
        return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, rows, *map(spec, projections)),
                             out_specs=rows, check_vma=False)(x, w, idx, valid, *(v.get_value() for v in projections))


def _capturing(module: nnx.Module) -> bool:
    """Whether `module` runs inside `nnx.capture`, the only time anyone reads what it sows.

    Outside `nnx.capture`, Flax 0.12 still stores a sown value on the module itself (deprecated):
    every eager call would grow a live model by a tuple entry, and an `nnx.jit` step would return
    the values as extra outputs and retrace as the tuple grows. So the router records only when
    captured, and the serving and training programs never contain the record at all. Flax marks
    captured modules with `__captures__` (its own attribute, not API: if a release renames it,
    `router_choices` says that no layer recorded anything instead of returning wrong data)."""
    return hasattr(module, "__captures__")


def _stored_shape(weights) -> tuple[int, ...]:
    """Shape of an expert weight as stored (an `Int4Weight`'s packed array)."""
    return (weights.packed if isinstance(weights, Int4Weight) else weights).shape
