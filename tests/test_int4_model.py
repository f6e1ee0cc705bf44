"""Official-layout INT4 checkpoints: loaded packed, equal to transformers + compressed-tensors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Var
from paged import Rows

from kimi_jax import export, fixtures, generate
from kimi_jax.cache import PagedCache
from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.engine import BatchEngine
from kimi_jax.errors import CheckpointError
from kimi_jax.model import abstract_model
from kimi_jax.quant import Int4Weight, is_routed_expert
from kimi_jax.reference import load_reference, reference_greedy, reference_logits
from kimi_jax.sampling import SamplingParams, knob_arrays
from kimi_jax.steps import SlotState, decode_steps, split_state

CFG = fixtures.with_fixture_token_ids(TINY.replace(quantization=Int4Quant(group_size=16)))
# Expert widths the TPU kernels take (packing "tpu": N a multiple of 128, K a whole number of 8-group tiles).
TPU_CFG = CFG.replace(hidden_size=256, moe_intermediate_size=256, quantization=Int4Quant(group_size=32))


@pytest.fixture(scope="module")
def int4(fixture_dir):
    path = fixture_dir("int4", CFG)
    model, cfg = load_model(path, dtype=jnp.float32, progress=False)
    return path, model, cfg


def test_routed_experts_stay_packed_at_4_5_bits_per_weight(int4):
    _, model, cfg = int4
    experts = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))
               if is_routed_expert(p, v)]
    assert len(experts) == 3 * cfg.n_moe_layers and all(isinstance(w, Int4Weight) for w in experts)
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
    engine = BatchEngine(model, max_len=64, chunk=8, page_size=4)
    assert engine.generate([prompt], SamplingParams(max_new_tokens=32))[0].tokens == reference_greedy(ref, prompt, 32)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["interpret_gpu", "interpret_tpu"])
def test_interpreted_pallas_kernels_give_the_reference_logits(int4, impl):
    # The INT4 expert kernels and the paged decode attention, through prefill and decode steps. The
    # GEMV kernel applies scales to float32 sums instead of rounding each dequantized weight to bf16
    # as the reference (and compressed-tensors) do, so the two differ by about that rounding (2^-9
    # relative per matmul), not more.
    _, model, cfg = int4
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size - 256, 6).tolist()
    logits = {}
    for name in ("xla", impl):
        rows = Rows(model, 1, 16, impl=name)
        first = rows.prefill([prompt], chunk=8)
        logits[name] = np.concatenate([first, rows.decode([int(first[0].argmax())])])
    assert np.abs(logits[impl] - logits["xla"]).max() <= 2e-2 * np.abs(logits["xla"]).max()
    assert (logits[impl].argmax(-1) == logits["xla"].argmax(-1)).all()


_CALLS = ("jit", "pjit", "shard_map", "closed_call", "custom_jvp_call", "custom_vjp_call")


def _weight_uses(jaxpr, weights) -> set[str]:
    """Primitives that take a weight as an operand, looking through calls and shard_map bodies
    (each maps its operands to its body's inputs by position) and optimization barriers (which
    move nothing: model.embed_rows passes the table through one)."""
    used = set()
    for eqn in jaxpr.eqns:
        hits = [i for i, v in enumerate(eqn.invars) if isinstance(v, Var) and v in weights]
        if not hits:
            continue
        if eqn.primitive.name == "while":  # operands: cond consts, body consts, carry; the body takes the last two
            skip = eqn.params["cond_nconsts"]
            inner = eqn.params["body_jaxpr"].jaxpr
            used |= _weight_uses(inner, {inner.invars[i - skip] for i in hits if i >= skip})
            continue
        if eqn.primitive.name == "optimization_barrier":
            used |= _weight_uses(jaxpr, {eqn.outvars[i] for i in hits})
            continue
        body = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if eqn.primitive.name in _CALLS and body is not None:
            inner = getattr(body, "jaxpr", body)
            used |= _weight_uses(inner, {inner.invars[i] for i in hits})
        else:
            used.add(eqn.primitive.name)
    return used


@pytest.mark.parametrize("impl", ["interpret_gpu", "interpret_tpu"])
def test_decode_step_reads_every_weight_where_it_lies(int4, impl):
    # A layer loop that sliced each layer's weights out of stacked arrays made XLA copy them before
    # every GEMM and kernel (on a GPU as costly as reading them). Each matrix must go straight into
    # a matmul or a kernel (a kernel may view it reshaped: splitting a dimension of a row-major
    # array moves nothing), vectors (norms, router bias) into elementwise ops; only the embedding
    # is gathered (one row per token).

    if impl == "interpret_tpu":  # the TPU kernels read experts in their own packing, as the loader gives it
        cfg = TPU_CFG
        graphdef, state = abstract_model(cfg, jnp.float32, expert_packing="tpu")
    else:
        _, model, cfg = int4
        graphdef, state = nnx.split(model)
    model_def, weights = split_state(graphdef, state)
    cache = PagedCache.create(cfg, slots=2, max_len=32, page_size=4, n_pages=17, dtype=jnp.float32)
    knobs = knob_arrays([SamplingParams()] * 2)
    slots = SlotState.create(2, cache.lengths.sharding)

    def step(weights, cache):  # a block of several steps, as the engine runs when every slot decodes
        return decode_steps(model_def, weights, cache, slots, jnp.arange(2, dtype=jnp.int32), 4, knobs, max_steps=16,
                            impl=impl)

    closed = jax.make_jaxpr(step)(weights, cache)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    weights = set(closed.jaxpr.invars[:len(paths)])
    embed = closed.jaxpr.invars[next(i for i, p in enumerate(paths) if p.startswith("['embed']"))]
    matrices = {v for v in weights if v.aval.ndim > 1} - {embed}
    assert len(matrices) > 10 * cfg.num_hidden_layers // 3
    assert _weight_uses(closed.jaxpr, matrices) <= {"dot_general", "pallas_call", "reshape"}
    assert _weight_uses(closed.jaxpr, weights - matrices - {embed}) <= {"mul", "add", "broadcast_in_dim",
                                                                        "convert_element_type"}
    assert _weight_uses(closed.jaxpr, {embed}) == {"gather"}


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
