"""libtpu's compiler, no TPU: the decode step's expert block and paged attention, compiled for real
TPU topologies with a tensor=8 mesh, copy neither expert weights, their scales nor the cache.

scripts/tpu_compile_check.py does the compiling and the HLO walk; here at a small config whose
checkpoint-packing minor dimensions (16 scale columns, 32 down words per device) are not multiples
of 128, which is why no TPU kernel reads that packing; a test shows the walk sees the copy that
row-per-token cache pages cause.
"""

import functools
import math
import os

import jax
import pytest
from flax import nnx
from scripts_loader import load_script

from kimi_jax.config import TINY as TINY_CONFIG
from kimi_jax.config import Int4Quant
from kimi_jax.planner import activations, compiled, targets
from kimi_jax.quant import is_routed_expert
from kimi_jax.scheduler import DEFAULT_CHUNK
from kimi_jax.sharding import MeshSpec

pytestmark = pytest.mark.slow  # the whole module; `pytest -m "not slow"` skips it

check = load_script("tpu_compile_check")
TINY = check.CONFIGS["tiny"]
# The smallest K2-shaped model whose every sharded dimension suits the TPU formats at tensor=8.
STEP_CONFIG = TINY_CONFIG.replace(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=2048, num_hidden_layers=2, n_routed_experts=8,
    num_experts_per_tok=2, num_attention_heads=8, vocab_size=1024, q_lora_rank=64, kv_lora_rank=64,
    qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=2048,
    quantization=Int4Quant(group_size=32))


@pytest.fixture(scope="module", autouse=True)
def persistent_cache(tmp_path_factory):
    """JAX's on-disk compilation cache on, as the CLI, server and notebook turn it on; the plan must
    keep topology compiles (which cannot be loaded back) out of it."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    directory = tmp_path_factory.mktemp("xla_cache")
    for k, v in zip(keys, (str(directory), 0.0, 0)):
        jax.config.update(k, v)
    yield directory
    for k, v in saved.items():
        jax.config.update(k, v)


@functools.cache  # the tests below share compiles
def _decode_step(target, cfg):
    devices = targets.tpu_topology(target)
    info, programs, state, cache = compiled.compile_steps(cfg, devices=devices, mesh_text="tensor=8", max_len=1024,
                                                          batch=8, chunk=128, steps=("decode",))
    assert (info["expert_packing"], info["page_order"], info["kernels"]) == ("tpu", "lanes", "pallas_tpu")
    experts = [x for p, v in nnx.to_flat_state(state) if is_routed_expert(p, v) for x in jax.tree.leaves(v.get_value())]
    return programs["decode"], experts, list(cache.pages)


@pytest.mark.parametrize("target", ["v5p:2x2x2", "tpu7x:2x2x1"])
def test_the_whole_decode_step_compiles_for_tpu_without_copying_experts_or_the_cache(target):
    # The runtime's own compiled decode step (engine.decode_step, every layer) with the formats and
    # Mosaic kernels it uses on TPU: no expert weight, scale or cache pool is copied or relaid out.
    step, experts, pools = _decode_step(target, STEP_CONFIG)
    watched = {x.sharding.shard_shape(x.shape) for x in experts + pools}
    assert check.copies_of(step.as_text(), watched) == []


def test_decode_temporaries_do_not_grow_with_the_experts():
    # Four times the experts: four times the expert bytes in the arguments, the same temporaries
    # (a per-layer copy of the expert slab would add three slabs).
    small, _, _ = _decode_step("v5p:2x2x2", STEP_CONFIG)
    big, experts, _ = _decode_step("v5p:2x2x2", STEP_CONFIG.replace(n_routed_experts=32))
    slab = sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in experts)
    grown = big.memory_analysis().argument_size_in_bytes - small.memory_analysis().argument_size_in_bytes
    assert grown >= 0.7 * slab
    assert big.memory_analysis().temp_size_in_bytes <= small.memory_analysis().temp_size_in_bytes + slab / 16


@pytest.mark.parametrize("target", ["v5p:2x2x2", "tpu7x:2x2x1"])
def test_decode_and_prefill_blocks_compile_for_tpu_without_copying_weights_or_the_cache(target):
    report = check.check(target, "tensor=8", TINY)
    moe, attention, prefill = report["moe"], report["attention"], report["prefill_attention"]
    assert moe["copies"] == [] and attention["copies"] == [] and prefill["copies"] == []
    # A prefill row of the runtime's chunk with K2's 8 heads per device (1024 queries, more than
    # one grid step holds) runs the Mosaic kernel in query blocks, not the XLA reference.
    assert (TINY.chunk, TINY.heads // 8) == (DEFAULT_CHUNK, 8)
    assert attention["kernels"] == prefill["kernels"] == ["paged_mla_attention_tpu"]
    # Temporaries are activations and metadata, far below what one layer's experts weigh.
    assert moe["temp_bytes"] < moe["expert_slab_bytes"] / 8
    assert attention["temp_bytes"] < attention["pool_bytes"] / 8


def test_the_check_sees_row_pages_copied_and_no_kernel_reads_the_checkpoint_packing():
    report = check.check("v5p:2x2x2", "tensor=8", TINY, packing="ct", page_order="rows")
    # Pages of 576-wide rows: XLA:TPU copies the whole pool into its own tiling, and the walk sees it.
    pool = f"bf16[{TINY.tokens * TINY.context // TINY.page + 1},{TINY.page},{TINY.lora + TINY.rope}]"
    assert [c.split()[-1] for c in report["attention"]["copies"]] == [pool]
    assert report["attention"]["temp_bytes"] > report["attention"]["pool_bytes"]
    # No TPU kernel reads the checkpoint's packing: the block runs the XLA reference, which
    # dequantizes one expert at a time (no slab-shaped copy; see test_kernels.py for the bound).
    assert report["moe"]["copies"] == []


def test_copies_are_found_by_result_shape_in_hlo_text():
    hlo = """
  %copy.3 = bf16[8,256,16]{2,1,0:T(8,128)(2,1)} copy(%p.1), sharding={replicated}
  %fusion.2 = s32[8,512,32]{2,1,0:T(8,128)} fusion(%p.2), kind=kLoop, calls=%fused
  %fusion.4 = s32[8,512,32]{2,1,0:T(8,128)} fusion(%p.2), kind=kOutput, calls=%fused2
  ROOT %transpose.1 = f32[4,4]{0,1} transpose(%x), dimensions={1,0}
  %add.5 = bf16[8,256,16]{2,1,0} add(%a, %b)
"""
    found = check.copies_of(hlo, [(8, 256, 16), (8, 512, 32), (4, 4)])
    assert found == ["copy copy.3 bf16[8,256,16]", "fusion fusion.2 s32[8,512,32]", "transpose transpose.1 f32[4,4]"]


def test_topology_compiles_leave_nothing_in_the_persistent_cache(persistent_cache):
    _decode_step("v5p:2x2x2", STEP_CONFIG)  # compiled, by this test or an earlier one, with the cache on
    # Host-side helpers compiled for the CPU may be stored; the TPU programs must not be.
    assert [name for name in os.listdir(persistent_cache) if "decode_step" in name] == []


@functools.cache
def _temporaries(layers):
    cfg = STEP_CONFIG.replace(num_hidden_layers=5)
    return compiled.temporaries(cfg, devices=targets.tpu_topology("v5p:2x2x2"), mesh_text="tensor=8", max_len=2048,
                                batch=8, chunk=128, dtype="bfloat16", layers=layers)


def test_temporaries_from_a_few_layers_extrapolate_to_the_whole_models():
    # 1 dense + 4 MoE layers compiled whole, against 2 and 3 layers extrapolated by one MoE layer's share.
    # The compiler reuses buffers across layers, so a layer's share measured on a cut model may
    # overstate what it adds to the whole one: the estimate may err high (a plan on the safe side),
    # by little, and must not err low.
    full, scaled = _temporaries("all"), _temporaries("scaled")
    assert full["how"] == "compiled for TPU v5, all 5 layers"
    assert "with 2 and 3 of 5 layers" in scaled["how"]
    for name in ("prefill", "decode"):
        assert full[name] > 0, name
        assert 0.95 * full[name] - 2**16 <= scaled[name] <= 1.15 * full[name] + 2**16, (name, scaled, full)


def test_the_gpu_activation_model_is_above_what_libtpu_assigns_for_the_same_programs():
    cfg = STEP_CONFIG.replace(num_hidden_layers=5)
    model = activations.modelled(cfg, MeshSpec.parse("tensor=8"), batch=8, chunk=128, max_len=2048)
    full = _temporaries("all")
    assert model["prefill"] >= full["prefill"] and model["decode"] >= full["decode"]
