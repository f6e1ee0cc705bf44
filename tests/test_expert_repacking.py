"""Loading INT4 experts into a packing other than the checkpoint's (the TPU one): the same weights,
the same logits, an export that gives back the original tensors, and one compiled repack per
projection shape rather than one per parameter."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from paged import Rows

from kimi_jax import fixtures
from kimi_jax.checkpoint import load_model
from kimi_jax.checkpoint.expert_repacking import repack_compiles
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.export import iter_hf_tensors
from kimi_jax.quant import Int4Weight, is_routed_expert
from kimi_jax.sharding import MeshSpec, make_mesh

# Expert widths the "tpu" packing takes: a whole number of 8-group tiles along every input; three
# MoE layers, so that each projection shape recurs.
CFG = fixtures.with_fixture_token_ids(TINY.replace(hidden_size=256, moe_intermediate_size=512, num_hidden_layers=4,
                                                   quantization=Int4Quant(group_size=32)))


@pytest.fixture(scope="module")
def loaded(fixture_dir):
    path = fixture_dir("repack", CFG, tokenizer=False)
    models = {"ct": load_model(path, dtype=jnp.float32, progress=False, expert_packing="ct")[0]}
    before = repack_compiles()
    models["tpu"] = load_model(path, dtype=jnp.float32, progress=False, expert_packing="tpu")[0]
    return path, models, repack_compiles() - before


def _experts(model):
    return [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model)) if is_routed_expert(p, v)]


def test_experts_are_loaded_into_the_requested_packing_with_the_same_weights(loaded):
    _, models, _ = loaded
    ct, tpu = _experts(models["ct"]), _experts(models["tpu"])
    assert len(tpu) == 3 * CFG.n_moe_layers
    assert all(isinstance(w, Int4Weight) and w.packing == "tpu" for w in tpu)
    assert tpu[0].packed.shape != ct[0].packed.shape  # [E, K/8, N] rather than [E, N, K/8]
    for a, b in zip(ct, tpu):
        np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))


def test_a_model_in_the_tpu_packing_computes_the_same_logits(loaded):
    _, models, _ = loaded
    prompt = np.random.default_rng(0).integers(0, CFG.vocab_size - 256, 9).tolist()
    logits = [Rows(m, 1, 32).prefill([prompt], chunk=8) for m in (models["ct"], models["tpu"])]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_export_from_the_tpu_packing_gives_back_the_checkpoint_tensors(loaded):
    _, models, _ = loaded
    original = dict(iter_hf_tensors(models["ct"]))
    for name, arr in iter_hf_tensors(models["tpu"]):
        np.testing.assert_array_equal(arr, original[name], err_msg=name)


def test_one_repack_program_serves_every_layer(loaded, fixture_dir):
    # gate and up share a shape, down has its own: two programs for all of the layers' experts.
    _, _, compiled = loaded
    assert CFG.n_moe_layers >= 3 and compiled == 2
    # A sharded load places the repacked words where the mesh wants them, still with few programs.
    mesh = make_mesh(MeshSpec.parse("data=1,expert=4,tensor=2"))
    before = repack_compiles()
    sharded, _ = load_model(fixture_dir("repack", CFG, tokenizer=False), dtype=jnp.float32, mesh=mesh,
                            progress=False, expert_packing="tpu")
    assert repack_compiles() - before == 2
    for got, want in zip(_experts(sharded), _experts(loaded[1]["tpu"])):
        assert {"expert", "tensor"} <= set(got.packed.sharding.spec)  # experts and hidden units split
        np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
