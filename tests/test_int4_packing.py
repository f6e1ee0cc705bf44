"""INT4 packings (kernels_pallas/int4_packing.py): every packing dequantizes bit for bit like compressed-tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

from kernels_pallas import int4_packing as packings
from kernels_pallas.int4_ct import quantize_int4, unpack_int4
from kernels_pallas.int4_packing import PACKINGS, features

# Jitted once per shape: op-by-op dispatch would compile every small op of the repack separately.
to_packing = jax.jit(packings.to_packing, static_argnums=2)
from_packing = jax.jit(packings.from_packing, static_argnums=2)
dequantize = jax.jit(packings.dequantize, static_argnums=(2, 3))


def checkpoint_arrays(rng, shape, group):
    """Random weights quantized the way compressed-tensors does, bf16 scales as K2 ships them."""
    return quantize_int4(rng.normal(size=shape).astype(np.float32) * 0.05, group)


def compressed_tensors_dequant(packed, scale, group):
    """compressed-tensors' own unpack and dequant of checkpoint arrays, one matrix at a time."""
    *lead, n, k8 = packed.shape
    k = k8 * 8
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    out = []
    for p, s in zip(packed.reshape(-1, n, k8), scale.reshape(-1, n, scale.shape[-1])):
        q = unpack_from_int32(torch.from_numpy(np.ascontiguousarray(p)), 4, torch.Size((n, k)))
        w = ct_dequantize(q, torch.from_numpy(s.astype(np.float32)).to(torch.bfloat16), None, args)
        out.append(w.view(torch.int16).numpy().view(np.uint16))
    return np.stack(out).reshape(*lead, n, k)


# K2-like at small size: gate/up (N = expert hidden, K = model width), down (swapped), a tensor=8
# shard of down (8 groups of 32), other group sizes, a lone matrix, an N that is not a multiple of 128.
SHAPES = [((4, 256, 512), 32), ((4, 512, 256), 32), ((2, 3, 128, 256), 32), ((96, 1024), 64),
          ((3, 40, 128), 16), ((5, 24, 64), 8)]


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shape,group", SHAPES)
def test_every_packing_dequantizes_bit_identically_to_compressed_tensors(packing, shape, group):
    rng = np.random.default_rng(sum(shape) + group)
    packed, scale = checkpoint_arrays(rng, shape, group)
    theirs = compressed_tensors_dequant(packed, scale, group)
    held = to_packing(packed, scale, packing)
    ours = np.asarray(dequantize(*held, packing, jnp.bfloat16)).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape,group", SHAPES)
def test_tpu_packing_round_trips_to_the_checkpoint_words_at_the_same_size(shape, group):
    rng = np.random.default_rng(len(shape) * group)
    packed, scale = checkpoint_arrays(rng, shape, group)
    words, scales = to_packing(packed, scale, "tpu")
    *lead, n, k8 = packed.shape
    # N minor in both arrays; not one byte more than the checkpoint (4.5 bits per weight for g=32).
    assert words.shape == (*lead, k8, n) and scales.shape == (*lead, scale.shape[-1], n)
    assert words.dtype == jnp.int32 and scales.dtype == scale.dtype
    assert words.nbytes + scales.nbytes == packed.nbytes + scale.nbytes
    assert features(words, scales, "tpu") == features(packed, scale, "ct") == (n, k8 * 8)
    back = from_packing(words, scales, "tpu")
    np.testing.assert_array_equal(np.asarray(back[0]), packed)
    np.testing.assert_array_equal(np.asarray(back[1]).view(np.uint16), scale.view(np.uint16))


def test_tpu_tiles_decode_by_shift_mask_and_or_into_bfloat16_in_column_order():
    # The property the Mosaic kernels are built on (int4_packing.py, "Tiles"): in tile T, chain c of word
    # rows [gT, g(T+1)), as bf16 pairs with the low half first, is 128 + u of columns
    # 8gT + 2gc + [0, 2g) in order.
    rng = np.random.default_rng(7)
    group, n = 32, 16
    packed, scale = checkpoint_arrays(rng, (n, 2 * 8 * group), group)
    u = np.asarray(unpack_int4(packed, packed.shape[-1] * 8)).astype(np.int32) + 8  # [n, K]
    words = np.asarray(to_packing(packed, scale, "tpu")[0])
    for t in range(2):
        for c in range(4):
            pairs = ((words[group * t:group * (t + 1)] >> (4 * c)) & 0x000F000F) | 0x43004300
            halves = jax.lax.bitcast_convert_type(jnp.asarray(pairs), jnp.bfloat16)  # [g, n, 2]
            rows = np.asarray(jnp.swapaxes(halves, 1, 2).reshape(2 * group, n), np.float32)
            first = 8 * group * t + 2 * group * c
            np.testing.assert_array_equal(rows, u[:, first:first + 2 * group].T + 128)


def test_to_packing_runs_under_jit_for_a_loader_on_device():
    rng = np.random.default_rng(3)
    packed, scale = checkpoint_arrays(rng, (2, 128, 256), 32)
    jitted = to_packing(packed, scale, "tpu")
    eager = packings.to_packing(packed, scale, "tpu")
    for a, b in zip(jitted, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape,group,why", [
    ((8, 96), 32, "number of groups"),  # 3 groups: a tile holds 8
    ((8, 128), 4, "multiple of 8"),  # half a word per group
])
def test_tpu_packing_refuses_shapes_it_cannot_hold(shape, group, why):
    packed, scale = checkpoint_arrays(np.random.default_rng(0), shape, group)
    with pytest.raises(ValueError, match=why):
        packings.to_packing(packed, scale, "tpu")
    np.testing.assert_array_equal(np.asarray(packings.to_packing(packed, scale, "ct")[0]), packed)


def test_packing_names_are_checked():
    with pytest.raises(ValueError, match="unknown INT4 packing 'gpu'"):
        packings.to_packing(np.zeros((8, 16), np.int32), np.zeros((8, 4), np.float32), "gpu")
