"""INT4 in compressed-tensors pack-quantized form (kernels_pallas/int4_ct.py): bit-exact against
compressed-tensors' own pack/unpack/quantize/dequant."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from kernels_pallas.int4_ct import dequantize_int4_ref, pack_int4, quantize_int4, unpack_int4


def ct_args(group):
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)


def test_worked_example_of_spec():
    # docs/k2-format.md §3.4: q = [-8, -1, 0, 1, 7, 3, -3, 2] -> u = [0,7,8,9,15,11,5,10] -> 0xA5BF9870
    q = np.array([[-8, -1, 0, 1, 7, 3, -3, 2]], np.int8)
    word = pack_int4(q)
    assert word.dtype == np.int32 and word.shape == (1, 1)
    assert word[0, 0] == -1514170256 and word.view(np.uint32)[0, 0] == 0xA5BF9870
    np.testing.assert_array_equal(np.asarray(unpack_int4(word, 8)), q)


@pytest.mark.parametrize("shape", [(7, 64), (5, 13), (3, 4, 100), (2, 8)])
def test_pack_and_unpack_match_compressed_tensors(shape):
    rng = np.random.default_rng(sum(shape))
    q = rng.integers(-8, 8, shape).astype(np.int8)
    ours = pack_int4(q)
    theirs = pack_to_int32(torch.from_numpy(q), 4).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape[-1] == -(-shape[-1] // 8)
    back = unpack_from_int32(torch.from_numpy(ours), 4, torch.Size(shape)).numpy()
    np.testing.assert_array_equal(np.asarray(unpack_int4(ours, shape[-1])), back)


def test_unpack_accepts_numpy_and_jax_words_with_the_sign_bit_set():
    words = np.array([[-1, np.iinfo(np.int32).min, 0x12345678]], np.int32)
    expect = np.array([[7] * 8 + [-8] * 7 + [0] + [0, -1, -2, -3, -4, -5, -6, -7]], np.int8)
    for w in (words, jnp.asarray(words)):
        np.testing.assert_array_equal(np.asarray(unpack_int4(w, 24)), expect)


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        pack_int4(np.array([8], np.int8))


@pytest.mark.parametrize("group", [32, 16])
def test_quantize_matches_compressed_tensors(group):
    rng = np.random.default_rng(group)
    w = rng.normal(size=(12, 128)).astype(np.float32)
    w[0, :group] = 0.0  # an all-zero group: compressed-tensors replaces its zero scale by eps
    packed, scale = quantize_int4(w, group, scale_dtype=jnp.float32)
    groups = torch.from_numpy(w).reshape(12, 128 // group, group)
    ct_scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), ct_args(group))
    np.testing.assert_array_equal(scale, ct_scale.numpy())
    ct_q = quantize(torch.from_numpy(w), ct_scale, zp, ct_args(group), dtype=torch.int8)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 128)), ct_q.numpy())


def test_bf16_scales_are_absmax_over_7_5_and_round_trip_within_about_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 6, 64)).astype(np.float32)
    packed, scale = quantize_int4(w, 32)  # default: bf16 scales, as K2 ships them
    assert scale.dtype == jnp.bfloat16 and packed.shape == (3, 6, 8) and scale.shape == (3, 6, 2)
    absmax = np.abs(w.reshape(3, 6, 2, 32)).max(-1)
    np.testing.assert_array_equal(scale, (absmax / np.float32(7.5)).astype(jnp.bfloat16))
    back = np.asarray(dequantize_int4_ref(packed, scale, 64, jnp.float32))
    step = np.repeat(scale.astype(np.float32), 32, axis=-1)
    # Half a step, plus what the bf16 rounding of the scale and of each product adds (the group
    # maximum maps to +7.5 steps and clamps to 7).
    assert np.all(np.abs(back - w) <= 0.55 * step)


def test_dequant_reference_matches_compressed_tensors_bit_for_bit():
    rng = np.random.default_rng(2)
    q = rng.integers(-8, 8, (16, 96)).astype(np.int8)
    scale = (rng.uniform(0.5, 2.0, (16, 3)) * 1e-2).astype(jnp.bfloat16)
    theirs = dequantize(torch.from_numpy(q), torch.from_numpy(scale.astype(np.float32)).to(torch.bfloat16),
                        None, ct_args(32))
    assert theirs.dtype == torch.bfloat16
    ours = np.asarray(dequantize_int4_ref(pack_int4(q), scale, 96, jnp.bfloat16))
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(torch.int16).numpy().view(np.uint16))


def test_input_size_not_a_multiple_of_8_is_zero_padded():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 12)).astype(np.float32)
    packed, scale = quantize_int4(w, 4, scale_dtype=jnp.float32)
    assert packed.shape == (5, 2) and scale.shape == (5, 3)
    # The padding nibbles are zero words' bits, exactly as compressed-tensors pads.
    np.testing.assert_array_equal(packed[:, 1] >> 16, 0)
    back = np.asarray(dequantize_int4_ref(packed, scale, 12, jnp.float32))
    assert back.shape == (5, 12)
    assert np.all(np.abs(back - w) <= 0.5 * np.repeat(scale, 4, axis=-1) + 1e-6)
