"""libtpu's compiler, no TPU: the decode step's expert block and paged attention, compiled for real
TPU topologies with a tensor=8 mesh, copy neither expert weights, their scales nor the cache.

scripts/tpu_compile_check.py does the compiling and the HLO walk; here at a small config whose
checkpoint-layout minor dimensions (16 scale columns, 32 down words per device) are not multiples
of 128, so the checkpoint layout would be copied (the last test shows the walk sees that).
"""

import pytest
from scripts_loader import load_script

pytest.importorskip("libtpu", reason="the TPU compile checks need libtpu: pip install 'jax[tpu]'")
check = load_script("tpu_compile_check")
TINY = check.CONFIGS["tiny"]


@pytest.mark.parametrize("target", ["v5p:2x2x2", "tpu7x:2x2x1"])
def test_decode_blocks_compile_for_tpu_without_copying_weights_or_the_cache(target):
    report = check.check(target, "tensor=8", TINY)
    moe, attention = report["moe"], report["attention"]
    assert moe["copies"] == [] and attention["copies"] == []
    # Temporaries are activations and metadata, far below what one layer's experts weigh.
    assert moe["temp_bytes"] < moe["expert_slab_bytes"] / 8
    assert attention["temp_bytes"] < attention["pool_bytes"] / 8


def test_the_check_sees_the_checkpoint_layout_and_row_pages_copied():
    report = check.check("v5p:2x2x2", "tensor=8", TINY, layout="ct", kv_layout="rows")
    copied = " ".join(report["moe"]["copies"])
    e = TINY.experts
    # Gate/up scales [E, f/8, d/32] and down's words and scales [E, d, f/8/8], [E, d, f/8/32].
    for shape in (f"bf16[{e},256,16]", f"s32[{e},512,32]", f"bf16[{e},512,8]"):
        assert shape in copied
    assert report["moe"]["temp_bytes"] > report["moe"]["expert_slab_bytes"] / 2
    assert report["attention"]["copies"]


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
