"""Routing and expert dispatch on their own, against plain numpy written from docs/k2-format.md §4.6."""

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.config import TINY
from kimi_jax.moe import dispatch, expert_ffn, route
from kimi_jax.quant import quantize


def _route_numpy(x, router, bias, cfg):
    """Sigmoid scores; bias only for the choice (within the best groups); weights from the
    unbiased scores, normalized over the chosen experts, times routed_scaling_factor."""
    scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ router.T.astype(np.float64))))
    choice = scores + bias
    t, e = choice.shape
    if cfg.n_group > 1:
        grouped = choice.reshape(t, cfg.n_group, -1)
        group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :cfg.topk_group]
        mask = np.zeros_like(group_score, bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(mask[:, :, None], grouped, -np.inf).reshape(t, e)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(n_group=4, topk_group=2, num_experts_per_tok=3),
                                 TINY.replace(norm_topk_prob=False, num_experts_per_tok=3)],
                         ids=["k2", "group_limited", "unnormalized"])
def test_routing_chooses_with_the_bias_and_weighs_without_it(cfg):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, cfg.hidden_size)).astype(np.float32)
    router = (rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(cfg.n_routed_experts) * 0.5).astype(np.float32)
    w, idx = route(jnp.asarray(x), jnp.asarray(router), jnp.asarray(bias), cfg)
    w_ref, idx_ref = _route_numpy(x, router, bias, cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(idx_ref, -1))
    order, order_ref = np.argsort(np.asarray(idx), -1), np.argsort(idx_ref, -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_ref, order_ref, -1), rtol=1e-5)
    # The bias moves the choice but not the weights: with it zeroed, other experts win somewhere.
    _, idx_unbiased = route(jnp.asarray(x), jnp.asarray(router), jnp.zeros_like(jnp.asarray(bias)), cfg)
    assert (np.sort(np.asarray(idx_unbiased), -1) != np.sort(np.asarray(idx), -1)).any()


def _experts(rng, e, d, f):
    return [(rng.standard_normal((e, f, d)) / np.sqrt(d)).astype(np.float32) for _ in range(2)] + \
        [(rng.standard_normal((e, d, f)) / np.sqrt(f)).astype(np.float32)]


def _ffn_numpy(x, gate, up, down):
    g, u = gate @ x, up @ x
    return down @ (g / (1 + np.exp(-g)) * u)


def test_dispatch_mixes_each_tokens_chosen_experts_and_shards_add_up():
    rng = np.random.default_rng(1)
    t, k, e, d, f = 9, 3, 8, 16, 12
    x = rng.standard_normal((t, d)).astype(np.float32)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    gate, up, down = _experts(rng, e, d, f)
    want = np.stack([sum(w[i, j] * _ffn_numpy(x[i], gate[idx[i, j]], up[idx[i, j]], down[idx[i, j]])
                         for j in range(k)) for i in range(t)])

    def run(lo, hi):  # the experts [lo, hi) of one expert-parallel shard
        weights = [jnp.asarray(a[lo:hi]) for a in (gate, up, down)]
        return np.asarray(dispatch(jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx), hi - lo,
                                   lambda xs, gs: expert_ffn(xs, *weights, gs, "xla"), expert_offset=lo))

    np.testing.assert_allclose(run(0, e), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(run(0, 3) + run(3, 8), want, rtol=2e-5, atol=2e-5)
    assert np.abs(run(0, 3)).max() > 0 and np.abs(run(3, 8)).max() > 0


def test_int4_experts_compute_with_their_dequantized_weights():
    rng = np.random.default_rng(2)
    t, e, d, f = 7, 4, 64, 32
    xs = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    sizes = jnp.asarray([3, 0, 4, 0], jnp.int32)  # rows already sorted by expert
    dense = _experts(rng, e, d, f)
    packed = [quantize(a, 32) for a in dense]
    got = np.asarray(expert_ffn(xs, *packed, sizes, "xla"))
    deq = [np.asarray(p.dequantize(jnp.float32)) for p in packed]
    expert = np.repeat(np.arange(e), np.asarray(sizes))
    want = np.stack([_ffn_numpy(np.asarray(xs)[i], deq[0][expert[i]], deq[1][expert[i]], deq[2][expert[i]])
                     for i in range(t)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
