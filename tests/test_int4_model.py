"""Official-layout INT4 checkpoints: loaded packed, equal to transformers + compressed-tensors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import load_reference, reference_greedy, reference_logits

from kimi_jax import export, fixtures, generate
from kimi_jax.cache import LatentCache
from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.engine import Engine
from kimi_jax.errors import CheckpointError
from kimi_jax.quant import Int4Weight, is_routed_expert
from kimi_jax.sampling import SamplingParams

CFG = fixtures.with_fixture_token_ids(TINY.replace(quantization=Int4Quant(group_size=16)))


@pytest.fixture(scope="module")
def int4(fixture_dir):
    path = fixture_dir("int4", CFG)
    model, cfg = load_model(path, dtype=jnp.float32, progress=False)
    return path, model, cfg


def test_routed_experts_stay_packed_at_4_5_bits_per_weight(int4):
    _, model, cfg = int4
    experts = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))
               if is_routed_expert(p, v)]
    assert len(experts) == 3 and all(isinstance(w, Int4Weight) for w in experts)
    assert all(w.packed.dtype == jnp.int32 and w.scale.dtype == jnp.bfloat16 for w in experts)
    n_weights = sum(w.packed.size * 8 for w in experts)
    # group 16 here: 4 bits + 16 bits / 16 = 5 bits; K2's group 32 gives 4.5
    assert sum(w.nbytes for w in experts) * 8 / n_weights == pytest.approx(4 + 16 / 16)


def test_int4_logits_and_greedy_tokens_match_transformers_with_compressed_tensors(int4):
    path, model, cfg = int4
    ref = load_reference(path)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size - 256, (2, 20))
    ours = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, jnp.asarray(tokens)))
    assert np.abs(ours - reference_logits(ref, tokens)).max() <= 1e-3
    prompt = tokens[0, :6].tolist()
    engine = Engine(model, max_len=64, chunk=8, block=16)
    assert engine.generate([prompt], SamplingParams(max_new_tokens=32)).run().tokens[0] == \
        reference_greedy(ref, prompt, 32)


def test_interpreted_pallas_kernels_give_the_reference_logits(int4):
    from kernels_pallas import ops

    _, model, cfg = int4
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size - 256, (1, 6)))
    xla = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, tokens))
    with ops.use_impl("interpret_gpu"):
        kernel = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, tokens))
    assert np.abs(kernel - xla).max() <= 1e-3


def _all_avals(jaxpr):
    """Shapes of every value in a jaxpr and its sub-jaxprs (scan/cond bodies, shard_map, pallas)."""
    for v in (*jaxpr.invars, *jaxpr.constvars):
        yield v.aval
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_avals(inner)


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu", "interpret_tpu"])
def test_decode_never_materializes_one_layers_whole_expert_slab(int4, impl):
    # Slicing a layer out of the stacked experts (what a scan over them does) makes XLA copy all of
    # that layer's experts for the kernel on every step: 8.4 GB per K2 layer. The model must hand
    # the whole stack to the kernels instead, so no value of one layer's [experts, out, in/8]
    # shape may appear anywhere in the decode step's program.
    from kernels_pallas import ops

    _, model, cfg = int4
    assert cfg.n_moe_layers >= 2  # with one layer, the stack and a layer slab look alike
    packed = model.moe_layers.mlp.gate_proj.get_value().packed
    slab = packed.shape[1:]
    graphdef, state = nnx.split(model)
    cache = LatentCache.create(cfg, [0], 256, jnp.float32)

    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache)

    with ops.use_impl(impl):
        jaxpr = jax.make_jaxpr(step)(state, jnp.zeros((1, 1), jnp.int32), cache).jaxpr
    shapes = {tuple(a.shape) for a in _all_avals(jaxpr) if hasattr(a, "shape")}
    assert packed.shape in shapes  # the stack itself goes in whole
    assert slab not in shapes


def test_generate_cli_runs_the_int4_checkpoint(int4, capsys):
    path, _, _ = int4
    assert generate.main(["--checkpoint", str(path), "--prompt-ids", "7,8,9", "--max-new-tokens", "4",
                          "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


def _write(path, edit):
    tensors = dict(fixtures.random_hf_tensors(CFG, seed=2))
    edit(tensors)
    export.write_checkpoint(path, CFG, tensors.items())


def test_weight_shape_disagreeing_with_config_is_named(tmp_path):
    name = "model.layers.1.mlp.experts.3.down_proj.weight_shape"
    _write(tmp_path, lambda t: t.__setitem__(name, np.asarray([64, 16], np.int64)))
    with pytest.raises(CheckpointError, match=f"'{name}' = \\[64, 16\\] disagrees with config.json"):
        load_model(tmp_path, progress=False)


def test_scale_shape_not_matching_the_group_size_is_named(tmp_path):
    name = "model.layers.2.mlp.experts.0.gate_proj.weight_scale"
    _write(tmp_path, lambda t: t.__setitem__(name, t[name][:, :2]))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape \\[32, 2\\], expected \\[32, 4\\]"):
        load_model(tmp_path, progress=False)


def test_packed_tensors_without_quantization_config_are_refused(tmp_path):
    _write(tmp_path, lambda t: None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="packed int4 but config.json has no quantization_config"):
        load_model(tmp_path, progress=False)
