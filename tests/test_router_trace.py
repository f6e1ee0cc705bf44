"""Reading the router: `router_choices` reports what transformers' gate decides, and recording it costs
the serving and training programs nothing (they never contain the record)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import kimi_jax
from kimi_jax.config import TINY
from kimi_jax.engine import BatchEngine
from kimi_jax.fixtures import with_fixture_token_ids
from kimi_jax.reference import load_reference
from kimi_jax.router_trace import _traced_routing
from kimi_jax.sampling import SamplingParams, knob_arrays
from kimi_jax.steps import decode_steps

# Group-limited routing (2 of 4 groups) and top-3, so the selection bias and the group mask matter.
CFG = with_fixture_token_ids(TINY.replace(n_group=4, topk_group=2, num_experts_per_tok=3, num_hidden_layers=4))
TOKENS = np.random.default_rng(7).integers(0, CFG.vocab_size - 256, (2, 11))


@pytest.fixture(scope="module")
def routed(fixture_dir):
    path = fixture_dir("router_trace", CFG, tokenizer=False)
    return path, kimi_jax.load(path, dtype="float32", progress=False)


def _router_sigmoids(jaxpr) -> int:
    """Sigmoids over all routed experts ([..., e] outputs) in a jaxpr and its sub-jaxprs (pjit,
    shard_map, cond): one per routing computation. The SwiGLU's sigmoids have other widths."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "logistic" and eqn.outvars[0].aval.shape[-1] == CFG.n_routed_experts
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _router_sigmoids(inner)
    return count


def _reference_gates(path, tokens):
    """(router logits [t,e], weights [t,k], expert ids [t,k]) of every MoE layer of transformers' model."""
    ref = load_reference(path)
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
             for i, layer in enumerate(ref.model.layers) if i >= CFG.first_k_dense_replace]
    with torch.no_grad():
        ref(torch.as_tensor(tokens))
    for hook in hooks:
        hook.remove()
    return {i: tuple(x.float().numpy() for x in out) for i, out in seen.items()}


def test_router_choices_match_the_transformers_gate(routed):
    path, model = routed
    choices = kimi_jax.router_choices(model, TOKENS)
    ref = _reference_gates(path, TOKENS)
    assert choices.layers == tuple(sorted(ref)) == (1, 2, 3)
    k, e = CFG.num_experts_per_tok, CFG.n_routed_experts
    for row, layer in enumerate(choices.layers):
        logits, ref_weights, ref_ids = ref[layer]
        ids = np.asarray(choices.expert_ids[row]).reshape(-1, k)
        weights = np.asarray(choices.weights[row]).reshape(-1, k)
        np.testing.assert_allclose(np.asarray(choices.scores[row]).reshape(-1, e), 1 / (1 + np.exp(-logits)),
                                   atol=1e-5)
        # transformers leaves its top-k unsorted: compare each token's choices as expert -> weight.
        for t in range(ids.shape[0]):
            ours = dict(zip(ids[t].tolist(), weights[t].tolist()))
            theirs = dict(zip(ref_ids[t].astype(int).tolist(), ref_weights[t].tolist()))
            assert ours.keys() == theirs.keys()
            assert all(abs(ours[x] - theirs[x]) < 1e-5 for x in ours)


def test_the_choices_keep_the_prompt_shape_and_summarize_per_expert(routed):
    _, model = routed
    batch = kimi_jax.router_choices(model, TOKENS)
    one = kimi_jax.router_choices(model, TOKENS[1])
    layers, k, e = len(batch.layers), CFG.num_experts_per_tok, CFG.n_routed_experts
    assert batch.expert_ids.shape == (layers, *TOKENS.shape, k) and batch.scores.shape == (layers, *TOKENS.shape, e)
    assert one.expert_ids.shape == (layers, TOKENS.shape[1], k)
    np.testing.assert_array_equal(one.expert_ids, batch.expert_ids[:, 1])
    dense = batch.dense_weights()
    np.testing.assert_allclose(dense.sum(-1), np.asarray(batch.weights).sum(-1), rtol=1e-6)
    assert ((dense > 0).sum(-1) == k).all()
    counts = batch.expert_counts()
    assert counts.shape == (layers, e) and (counts.sum(-1) == TOKENS.size * k).all()
    np.testing.assert_array_equal(counts[0], np.bincount(np.asarray(batch.expert_ids[0]).ravel(), minlength=e))


@pytest.mark.parametrize("tokens, message", [
    (np.zeros((2, 3, 4), np.int32), r"\[t\] or \[b, t\]"),
    (np.zeros((0,), np.int32), "non-empty"),
    (np.array([0.5, 1.5]), "float64"),
    (np.array([1, CFG.vocab_size]), f"token id {CFG.vocab_size} is outside the vocabulary"),
    (np.array([-1, 2]), "token id -1 is outside"),
])
def test_bad_prompts_are_refused_with_the_reason(routed, tokens, message):
    with pytest.raises(kimi_jax.KimiError, match=message):
        kimi_jax.router_choices(routed[1], tokens)


def test_the_router_record_is_not_in_the_serving_or_training_programs(routed):
    _, model = routed
    device = BatchEngine(model, max_batch=2, max_len=32, chunk=8, page_size=4).device
    knobs = knob_arrays([SamplingParams()] * 2)
    rows = jnp.arange(2, dtype=jnp.int32)
    closed = jax.make_jaxpr(lambda weights, cache, state: decode_steps(
        device.model_def, weights, cache, state, rows, 1, knobs, max_steps=4, impl="xla"))(device.weights, device.cache,
                                                                                     device.state)
    # Outputs: the sampled tokens, the cache and the slot state, nothing else (no logits asked
    # for, no routing).
    assert len(closed.jaxpr.outvars) == 1 + len(jax.tree.leaves(device.cache)) + len(jax.tree.leaves(device.state))
    assert _router_sigmoids(closed.jaxpr) == CFG.n_moe_layers  # routing is computed once per layer

    graphdef, state = nnx.split(model)
    traced = jax.make_jaxpr(lambda s, t: _traced_routing(graphdef, s, t, layers=(1, 2, 3), impl="xla"))(state, TOKENS)
    assert len(traced.jaxpr.outvars) == 3
    assert _router_sigmoids(traced.jaxpr) == CFG.n_moe_layers  # the record reuses the routing's own scores


def test_plain_forwards_leave_no_intermediates_on_the_model(routed):
    _, model = routed
    forward = nnx.jit(lambda m, t: m.forward_no_cache(t))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # Flax warns when a sow lands on the module
        forward(model, TOKENS)
        kimi_jax.router_choices(model, TOKENS)
        forward(model, TOKENS)
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
