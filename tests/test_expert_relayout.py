"""Loading INT4 experts into a device layout other than the checkpoint's (the TPU one): the same
weights, the same logits, and an export that gives back the original tensors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from paged import Rows

from kimi_jax import fixtures
from kimi_jax.checkpoint import iter_hf_tensors, load_model
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.quant import Int4Weight, is_routed_expert

# Expert widths the "tpu" layout takes: a whole number of 8-group tiles along every input.
CFG = fixtures.with_fixture_token_ids(TINY.replace(hidden_size=256, moe_intermediate_size=256,
                                                   quantization=Int4Quant(group_size=32)))


@pytest.fixture(scope="module")
def loaded(fixture_dir):
    path = fixture_dir("relayout", CFG, tokenizer=False)
    return path, {layout: load_model(path, dtype=jnp.float32, progress=False, expert_layout=layout)[0]
                  for layout in ("ct", "tpu")}


def _experts(model):
    return [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model)) if is_routed_expert(p, v)]


def test_experts_are_loaded_into_the_requested_layout_with_the_same_weights(loaded):
    _, models = loaded
    ct, tpu = _experts(models["ct"]), _experts(models["tpu"])
    assert all(isinstance(w, Int4Weight) and w.layout == "tpu" for w in tpu)
    assert tpu[0].packed.shape != ct[0].packed.shape  # [E, K/8, N] rather than [E, N, K/8]
    for a, b in zip(ct, tpu):
        np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))


def test_a_model_in_the_tpu_layout_computes_the_same_logits(loaded):
    _, models = loaded
    prompt = np.random.default_rng(0).integers(0, CFG.vocab_size - 256, 9).tolist()
    logits = [Rows(m, 1, 32).prefill([prompt], chunk=8) for m in (models["ct"], models["tpu"])]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_export_from_the_tpu_layout_gives_back_the_checkpoint_tensors(loaded):
    _, models = loaded
    original = dict(iter_hf_tensors(models["ct"]))
    for name, arr in iter_hf_tensors(models["tpu"]):
        np.testing.assert_array_equal(arr, original[name], err_msg=name)
