"""One record per platform says which kernels run and which memory formats they read, and the
formats it names are the ones those kernels take without falling back to the reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ops
from kernels_pallas.backends import BACKENDS, backend_for
from kernels_pallas.int4_ct import quantize_int4
from kernels_pallas.int4_packing import to_packing
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.model import expert_packing_for


def test_each_platform_has_one_record_and_gpu_runtimes_share_the_gpu_one():
    assert {p: (b.impl, b.expert_packing, b.page_order, b.page_size) for p, b in BACKENDS.items()} == {
        "cpu": ("xla", "ct", "rows", 64), "gpu": ("pallas_gpu", "ct", "rows", 64),
        "tpu": ("pallas_tpu", "tpu", "lanes", 128)}
    assert backend_for("cuda") is backend_for("rocm") is backend_for("gpu")
    with pytest.raises(ValueError, match="no kernels for platform 'metal'"):
        backend_for("metal")


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_the_kernels_of_a_record_read_its_formats(platform):
    backend = backend_for(platform)
    rng = np.random.default_rng(0)
    # K2-like at small size: N a multiple of 128, a whole number of 8-group tiles along K.
    packed, scale = quantize_int4(rng.normal(size=(2, 128, 256)).astype(np.float32) * 0.05, 32)
    weights = to_packing(packed, scale, backend.expert_packing)
    x, sizes = jnp.zeros((4, 256), jnp.bfloat16), jnp.asarray([3, 1], jnp.int32)
    assert ops.grouped_int4_matmul.fallback_reason(backend.impl, x, *weights, sizes,
                                                   packing=backend.expert_packing) is None
    pages = (jnp.zeros((3, 64 + 64, backend.page_size)) if backend.page_order == "lanes"
             else jnp.zeros((3, backend.page_size, 64 + 64)))
    q_lat, q_pe = jnp.zeros((2, 1, 4, 64)), jnp.zeros((2, 1, 4, 64))
    table, lens = jnp.ones((2, 2), jnp.int32), jnp.asarray([5, 9], jnp.int32)
    assert ops.paged_attention.fallback_reason(backend.impl, q_lat, q_pe, pages, table, lens - 1, lens,
                                               scale=0.1, page_order=backend.page_order) is None


def test_dense_experts_keep_the_checkpoint_packing_on_every_platform():
    int4 = TINY.replace(quantization=Int4Quant(group_size=16))
    assert [expert_packing_for(int4, b) for b in BACKENDS.values()] == ["ct", "ct", "tpu"]
    assert {expert_packing_for(TINY, b) for b in BACKENDS.values()} == {"ct"}
