"""Rotary numerics against transformers' DeepseekV3RotaryEmbedding (docs/k2-format.md §4.3): the
frequencies bit for bit, and cos/sin at positions up to K2's 262,144.

At position 131,072 a float32 angle has a resolution of 0.008 rad and one ulp of K2's largest
frequency turns into 0.008 rad of angle, so "close" frequencies are not enough: they must be the
same float32 numbers, multiplied by the position in float32, as in the stacks K2 runs on.
"""

import jax
import numpy as np
import pytest
import torch
from rotary_reference import correctly_rounded_frequencies, hf_rotary

from kimi_jax import rope
from kimi_jax.config import K2_THINKING, TINY, Yarn

CONFIGS = {
    "k2_thinking": K2_THINKING,
    "k2_instruct_0711": K2_THINKING.replace(rope_scaling=Yarn(factor=32.0), max_position_embeddings=131072),
    # DeepSeek-V3's own YaRN: beta_fast 32 makes a ramp of fractional weights over several pairs.
    "deepseek_v3": K2_THINKING.replace(rope_theta=10000.0, max_position_embeddings=163840,
                                       rope_scaling=Yarn(factor=40.0, beta_fast=32.0)),
    # mscale != mscale_all_dim: cos and sin carry a factor.
    "cos_sin_factor": TINY.replace(rope_scaling=Yarn(factor=16.0, original_max_position_embeddings=32,
                                                     beta_fast=32.0, mscale=1.0, mscale_all_dim=0.8)),
    "plain_rope": K2_THINKING.replace(rope_scaling=None),
}

# A few hundred positions over K2's whole context, its powers of two included.
K2_POSITIONS = np.unique(np.concatenate([
    np.linspace(0, 262_143, 301).astype(np.int64), [1, 4095, 4096, 65_536, 131_071, 131_072, 262_143],
    np.random.default_rng(0).integers(0, 262_144, 100)]))

_angles = jax.jit(rope.rope_angles, static_argnums=0)


def _hf_cos_sin(emb, positions):
    """transformers' cos and sin [positions, pairs] (it repeats the pairs twice over the rope dims)."""
    cos, sin = emb(torch.zeros(1), torch.as_tensor(positions)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _ours(cfg, positions):
    cos, sin = _angles(cfg, np.asarray(positions, np.int32))
    return np.asarray(cos), np.asarray(sin)


def _float32_power_is_correctly_rounded(cfg) -> np.ndarray:
    """Per pair: whether torch's float32 `base ** (2i / dim)`, the power in transformers' formula,
    equals the correctly rounded power (a float64 power rounded to float32)."""
    exponent = torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float) / cfg.qk_rope_head_dim
    return ((cfg.rope_theta ** exponent) == (cfg.rope_theta ** exponent.double()).float()).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_frequencies_are_transformers_formula_in_float32_with_a_correctly_rounded_power(name):
    cfg = CONFIGS[name]
    ours = rope.inv_freq(cfg)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, correctly_rounded_frequencies(cfg).numpy())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_frequencies_equal_transformers_wherever_its_float32_power_is_correctly_rounded(name):
    cfg = CONFIGS[name]
    ours, theirs = rope.inv_freq(cfg), hf_rotary(cfg).inv_freq.numpy()
    exact_power = _float32_power_is_correctly_rounded(cfg)
    np.testing.assert_array_equal(ours[exact_power], theirs[exact_power])
    # Elsewhere torch's power is one ulp off (1-ulp accurate, not correctly rounded); so is the frequency.
    assert (np.abs(ours.view(np.int32) - theirs.view(np.int32)) <= 1).all()


def test_k2_has_one_pair_where_torch_rounds_the_power_the_other_way():
    """The only K2 frequency on which kimi_jax and transformers-on-CPU disagree, documented in
    docs/k2-format.md §4.3: 50000^(10/64) lies 0.03 ulp from a rounding tie."""
    assert np.nonzero(~_float32_power_is_correctly_rounded(K2_THINKING))[0].tolist() == [5]


def test_cos_sin_match_transformers_over_k2s_whole_context():
    """Tolerance 0.005: the one-ulp difference in K2's pair 5 (above) moves cos/sin by at most
    262,143 × 2^-26 = 0.0039 rad at the last position, and nothing else differs. Frequencies rounded
    from a float64 evaluation (7 pairs one ulp off) were 0.008 off at 131,072 and 0.016 at 262,143."""
    cos, sin = _ours(K2_THINKING, K2_POSITIONS)
    ref_cos, ref_sin = _hf_cos_sin(hf_rotary(K2_THINKING), K2_POSITIONS)
    assert np.abs(cos - ref_cos).max() <= 0.005
    assert np.abs(sin - ref_sin).max() <= 0.005
    same_frequency = _float32_power_is_correctly_rounded(K2_THINKING)  # all pairs but 5
    assert np.abs(cos - ref_cos)[:, same_frequency].max() <= 2e-6
    assert np.abs(sin - ref_sin)[:, same_frequency].max() <= 2e-6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cos_sin_equal_transformers_given_the_same_frequencies(name):
    """With transformers holding kimi_jax's frequencies, the angles are the same float32 products
    and cos/sin agree to float32 rounding, up to the last position: no angle is formed in another
    precision, and cos/sin stay accurate at arguments of 10^5 rad on the backend that runs this."""
    cfg = CONFIGS[name]
    positions = K2_POSITIONS[K2_POSITIONS < cfg.max_position_embeddings]
    emb = hf_rotary(cfg)
    emb.inv_freq.copy_(torch.as_tensor(rope.inv_freq(cfg)))
    cos, sin = _ours(cfg, positions)
    ref_cos, ref_sin = _hf_cos_sin(emb, positions)
    assert np.abs(cos - ref_cos).max() <= 2e-6
    assert np.abs(sin - ref_sin).max() <= 2e-6
