"""Sampling: greedy, temperature, top-k and top-p on hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.draw import allowed_by_mask, row_keys, sample
from kimi_jax.errors import KimiError
from kimi_jax.sampling import SamplingParams, knob_arrays

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _draw(n, temperature, top_k, top_p, probs=PROBS):
    logits = jnp.log(jnp.asarray(np.tile(probs, (n, 1)), jnp.float32))
    knobs = knob_arrays([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * n)
    del knobs["halt"]  # a stopping setting, not a sampling one
    keys = row_keys(knobs.pop("seed"), jnp.arange(n))
    return np.asarray(jax.jit(sample)(logits, keys, **knobs))


def _freq(tokens, v=len(PROBS)):
    return np.bincount(tokens, minlength=v) / len(tokens)


def test_temperature_one_samples_the_softmax_distribution():
    f = _freq(_draw(20_000, 1.0, 0, 1.0))
    assert np.abs(f - PROBS).max() < 0.015


def test_temperature_zero_is_argmax():
    assert (_draw(64, 0.0, 0, 1.0) == 0).all()


def test_top_k_keeps_only_the_k_most_likely_renormalized():
    f = _freq(_draw(20_000, 1.0, 2, 1.0))
    assert f[2:].sum() == 0
    assert np.abs(f[:2] - PROBS[:2] / PROBS[:2].sum()).max() < 0.015


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 survive.
    f = _freq(_draw(20_000, 1.0, 0, 0.7))
    assert f[2:].sum() == 0 and np.abs(f[:2] - [0.625, 0.375]).max() < 0.015
    assert (_draw(256, 1.0, 0, 0.01) == 0).all()  # tiny p still keeps the top token


def test_low_temperature_sharpens_the_distribution():
    f = _freq(_draw(20_000, 0.5, 0, 1.0))
    sharp = PROBS ** 2 / (PROBS ** 2).sum()
    assert np.abs(f - sharp).max() < 0.015


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (4000, 1)), jnp.float32))
    temps = jnp.asarray([0.0, 1.0] * 2000, jnp.float32)
    out = np.asarray(sample(logits, row_keys(jnp.ones(4000, jnp.uint32), jnp.arange(4000)), temps,
                            jnp.zeros(4000, jnp.int32), jnp.ones(4000, jnp.float32)))
    assert (out[::2] == 0).all() and _freq(out[1::2])[1:].sum() > 0.3


@pytest.mark.parametrize("kw, name", [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                                      (dict(max_new_tokens=0), "max_new_tokens")])
def test_invalid_sampling_parameters_are_refused(kw, name):
    with pytest.raises(KimiError, match=name):
        SamplingParams(**kw)


def test_a_rows_draw_depends_only_on_its_seed_and_position():
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (3, 1)), jnp.float32))
    knobs = knob_arrays([SamplingParams(temperature=1.0, seed=s) for s in (7, 7, 8)])
    del knobs["halt"]
    seeds = knobs.pop("seed")
    draws = [np.asarray(sample(logits, row_keys(seeds, jnp.asarray([p, p, p])), **knobs)) for p in range(64)]
    draws = np.stack(draws)  # [positions, rows]
    assert (draws[:, 0] == draws[:, 1]).all()  # same seed, same positions: same tokens
    assert (draws[:, 0] != draws[:, 2]).any()  # another seed: another sequence


def test_a_bitmask_allows_exactly_the_tokens_whose_bits_are_set():
    # Bit i % 32 of word i // 32, the sign bit included, over a vocabulary that is not a multiple of 32.
    vocab, allowed = 70, [0, 5, 31, 32, 63, 69]
    words = np.zeros((2, 3), np.uint32)
    for i in allowed:
        words[0, i // 32] |= np.uint32(1 << (i % 32))
    words[1] = 0xFFFFFFFF
    got = np.asarray(allowed_by_mask(jnp.asarray(words.view(np.int32)), vocab))
    assert np.flatnonzero(got[0]).tolist() == allowed and got[1].all()


def test_too_many_stop_ids_are_refused():
    with pytest.raises(KimiError, match="at most 12 stop token ids"):
        SamplingParams(stop_ids=tuple(range(13)))
