"""Which experts the router picks for a prompt: per MoE layer, every token's chosen expert ids, their
mixing weights and the raw sigmoid scores over all experts.

Each MoE layer sows its routing as an `nnx.Intermediate` (moe.py), but only inside `nnx.capture`:
the serving and training programs never contain the record, so reading the router costs nothing
when nobody reads it. `router_choices` runs the plain causal forward under capture in one compiled
program (the final norm and lm_head are dead there, so XLA drops them) and stacks the layers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from kimi_jax.errors import KimiError
from kimi_jax.model import KimiK2, default_impl
from kimi_jax.moe import ROUTING


@dataclasses.dataclass(frozen=True)
class RouterChoices:
    """The router's decisions for a prompt, one row per MoE layer.

    `tokens` is the shape of the prompt given to `router_choices` ([t] or [b, t]); k is
    `num_experts_per_tok`, e is `n_routed_experts`."""

    layers: tuple[int, ...]  # the model layer index of each row (the dense first layers have no router)
    expert_ids: jax.Array  # [L, *tokens, k] int32, best first
    weights: jax.Array  # [L, *tokens, k] float32: each chosen expert's share, routed_scaling_factor included
    scores: jax.Array  # [L, *tokens, e] float32: sigmoid affinities before the selection bias

    def dense_weights(self) -> np.ndarray:
        """The mixing weights scattered over all experts, [L, *tokens, e] (0 where not chosen)."""
        ids, weights = np.asarray(self.expert_ids), np.asarray(self.weights)
        out = np.zeros(self.scores.shape, np.float32)
        np.put_along_axis(out, ids, weights, axis=-1)
        return out

    def expert_counts(self) -> np.ndarray:
        """How many tokens chose each expert, per layer: [L, e] int64."""
        n_experts = self.scores.shape[-1]
        ids = np.asarray(self.expert_ids).reshape(len(self.layers), -1)
        return np.stack([np.bincount(row, minlength=n_experts) for row in ids])


def router_choices(model: KimiK2, tokens: ArrayLike, *, impl: str | None = None) -> RouterChoices:
    """Run `tokens` ([t] or [b, t] token ids) through `model` and return every MoE layer's routing.

    The same routing the model computes when it generates (same scores, same bias, same top-k).
    For a model placed on a mesh, call it inside `with jax.set_mesh(mesh):`. `impl` names the
    kernels (default: the best for the default backend)."""
    ids = np.asarray(tokens)
    if ids.ndim not in (1, 2) or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise KimiError(f"tokens must be a non-empty [t] or [b, t] array of token ids, got shape {list(ids.shape)} "
                        f"of {ids.dtype}")
    cfg = model.cfg
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise KimiError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    layers = tuple(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    if not layers:
        raise KimiError("this model has no MoE layer (first_k_dense_replace == num_hidden_layers)")
    graphdef, state = nnx.split(model)
    expert_ids, weights, scores = _traced_routing(graphdef, state, jnp.asarray(ids.reshape(-1, ids.shape[-1])),
                                                  layers=layers, impl=impl or default_impl())
    lead = (len(layers), *ids.shape)
    return RouterChoices(layers, expert_ids.reshape(*lead, -1), weights.reshape(*lead, -1),
                         scores.reshape(*lead, -1))


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "impl"))
def _traced_routing(graphdef, state, tokens, *, layers: tuple[int, ...], impl: str):
    """(expert ids, weights, scores), each stacked over `layers`, for tokens [b, t]."""
    model = nnx.merge(graphdef, state)
    _, captured = nnx.capture(lambda m: m.forward_no_cache(tokens, impl=impl), nnx.Intermediate)(model)
    recorded = {path[1]: var.get_value()[0] for path, var in nnx.to_flat_state(captured)
                if path[0] == "layers" and path[-1] == ROUTING}
    if set(recorded) != set(layers):
        raise KimiError(f"MoE layers {sorted(set(layers) - set(recorded))} recorded no routing under nnx.capture "
                        f"(Flax {_flax_version()} may capture differently from the 0.12 series)")
    return tuple(jnp.stack([recorded[i][key] for i in layers]) for key in ("expert_ids", "weights", "scores"))


def _flax_version() -> str:
    import flax

    return flax.__version__
