"""The CPU programs multiply the stored bf16 weights in place: no float32 copy of a weight appears
among XLA:CPU's temporaries (K2's lm_head alone made one of 4.7 GB, which doubled a CPU run's host
memory). Asked of the compiler's own memory analysis, so nothing large is allocated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.config import TINY, Int4Quant
from kimi_jax.layers import linear
from kimi_jax.planner import compiled as planner_compiled

VOCAB, WIDTH = 32768, 256  # a weight of 16 MB in bf16, 32 MB as float32


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_linear_keeps_the_weight_in_bf16_for_any_number_of_rows(rows, out_dtype):
    w = jax.ShapeDtypeStruct((VOCAB, WIDTH), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((rows, 1, WIDTH), jnp.bfloat16)
    weight_bytes = VOCAB * WIDTH * 2
    assert _temp_bytes(lambda x, w: linear(x, w, out_dtype), x, w) < weight_bytes / 8
    # What the plain einsum does on this backend: a float32 copy of the whole weight.
    if rows == 1 or out_dtype == jnp.bfloat16:
        plain = _temp_bytes(lambda x, w: jnp.einsum("...d,vd->...v", x, w).astype(out_dtype), x, w)
        assert plain >= 2 * weight_bytes


def test_linear_is_the_einsum_it_replaces():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(96, 64)), jnp.bfloat16)
    for shape in ((1, 64), (1, 1, 64), (3, 5, 64)):
        x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
        want = jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)
        got = linear(x, w, jnp.float32)
        assert got.shape == want.shape and linear(x, w).dtype == jnp.bfloat16
        # A single row goes through a matrix product instead of XLA's vector rewrite: the float32
        # sums may round in another order.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(linear(x, w), np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


def test_cpu_decode_and_prefill_hold_no_float32_copy_of_the_vocabulary_matrices():
    cfg = TINY.replace(vocab_size=VOCAB, hidden_size=WIDTH, quantization=Int4Quant(group_size=16))
    _, compiled, _, _ = planner_compiled.compile_steps(cfg, devices=jax.devices()[:1], mesh_text="data=1", max_len=64,
                                           batch=1, chunk=16)
    lm_head = VOCAB * WIDTH * 2
    for name, program in compiled.items():
        assert program.memory_analysis().temp_size_in_bytes < lm_head / 2, name


def test_cpu_decode_temporaries_do_not_grow_with_the_page_pool():
    # XLA:CPU converted a whole bf16 pool to float32 around every cache write and read (three
    # whole-pool passes per layer and step), so a lone request in a 32-slot engine decoded 7x slower
    # than in a 1-slot one. The CPU backend stores the pool as bf16 words; no pool-sized temporary.
    cfg = TINY.replace(quantization=Int4Quant(group_size=16))
    temps, pools = [], []
    for max_len in (64, 4096):
        _, compiled, _, cache = planner_compiled.compile_steps(cfg, devices=jax.devices()[:1], mesh_text="data=1",
                                                   max_len=max_len, batch=2, chunk=16, steps=("decode",))
        temps.append(compiled["decode"].memory_analysis().temp_size_in_bytes)
        pools.append(cache.pages[0].size * cache.pages[0].dtype.itemsize)
    assert temps[1] - temps[0] < (pools[1] - pools[0]) / 10, (temps, pools)
    assert cache.pages[0].dtype == jnp.uint16
