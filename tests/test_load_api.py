"""kimi_jax.load / random_model / shard / device_mesh: either kind of directory, placement by the
parameters' logical axes, and a clear refusal of a mesh or dtype that cannot work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kimi_jax
from kimi_jax import convert
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.fixtures import with_fixture_token_ids

CFG = with_fixture_token_ids(TINY.replace(quantization=Int4Quant(group_size=16)))


@pytest.fixture(scope="module")
def hf_dir(fixture_dir):
    return fixture_dir("loading_int4", CFG, tokenizer=False)


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(nnx.state(model))]


def _spec(value) -> P:
    return value.sharding.spec


def test_hf_and_converted_directories_load_to_the_same_parameters(hf_dir, tmp_path):
    out = tmp_path / "converted"
    convert.convert(str(hf_dir), str(out), dtype=jnp.float32, progress=False)
    from_hf = kimi_jax.load(hf_dir, dtype="float32", progress=False)
    from_converted = kimi_jax.load(out, dtype="float32")
    assert from_hf.cfg == from_converted.cfg == CFG
    for a, b in zip(_leaves(from_hf), _leaves(from_converted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loading_onto_a_mesh_splits_experts_and_heads_and_computes_the_same_logits(hf_dir):
    plain = kimi_jax.load(hf_dir, dtype="float32", progress=False)
    mesh = kimi_jax.device_mesh(CFG, "expert=4,tensor=2")
    placed = kimi_jax.load(hf_dir, dtype="float32", mesh=mesh, progress=False)
    moe, attn = placed.layers[1].mlp, placed.layers[1].attn
    assert _spec(moe.gate_proj.get_value().packed) == P("expert", "tensor", None)
    assert _spec(moe.down_proj.get_value().scale) == P("expert", None, "tensor")
    assert _spec(attn.q_b_proj.get_value()) == P("tensor", None, None)
    assert moe.router.get_value().sharding.is_fully_replicated
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size - 256, (2, 9))
    forward = nnx.jit(lambda m, t: m.forward_no_cache(t))
    with jax.set_mesh(mesh):
        sharded = np.asarray(forward(placed, tokens))
    np.testing.assert_allclose(sharded, np.asarray(forward(plain, tokens)), atol=1e-4)


@pytest.mark.slow
def test_random_models_are_reproducible_and_drawn_in_place_on_the_mesh():
    # Two layers (one dense, one MoE): every random draw adds to the compile (~1 s each on 2 cores).
    cfg = TINY.replace(num_hidden_layers=2, quantization=Int4Quant(group_size=16))
    mesh = kimi_jax.device_mesh(cfg, "data=2,expert=2,tensor=2")
    first = kimi_jax.random_model(cfg, seed=1, mesh=mesh)
    again, other = kimi_jax.random_model(cfg, seed=1), kimi_jax.random_model(cfg, seed=2)  # one device
    for a, b, c in zip(_leaves(first), _leaves(again), _leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)
        if a.std() > 0:  # norms start at one and the router bias at zero under any seed
            assert not np.array_equal(a, c)
    up = first.layers[1].mlp.up_proj.get_value()
    assert up.packed.dtype == jnp.int32 and up.packed.shape == (8, cfg.moe_intermediate_size, cfg.hidden_size // 8)
    assert _spec(up.packed) == P("expert", "tensor", None)
    assert _spec(first.lm_head.get_value()) == P("tensor", None)

    back = kimi_jax.shard(first, None)
    assert back.lm_head.get_value().sharding.device_set == {jax.devices()[0]}
    moved = kimi_jax.shard(back, "expert=8")
    assert _spec(moved.layers[1].mlp.up_proj.get_value().packed) == P("expert", None, None)
    for a, b in zip(_leaves(first), _leaves(moved), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_default_mesh_uses_every_device_experts_first():
    mesh = kimi_jax.device_mesh(TINY)
    assert dict(mesh.shape) == {"data": 1, "expert": 8, "tensor": 1} and mesh.size == jax.device_count()
    two = kimi_jax.device_mesh(TINY, kimi_jax.MeshSpec(expert=2), devices=jax.devices()[:2])
    assert dict(two.shape) == {"data": 1, "expert": 2, "tensor": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float16"}, "dtype must be bfloat16 or float32, got 'float16'"),
    ({"mesh": "expert=3"}, "mesh data=1,expert=3,tensor=1 needs 3 devices, but 8 are available"),
    ({"mesh": "experts=8"}, "'experts=8' is not AXIS=SIZE"),
    ({"mesh": 8}, "mesh must be a jax.sharding.Mesh, a MeshSpec, 'auto' or text"),
    ({"mesh": Mesh(np.asarray(jax.devices()), ("x",))}, r"mesh axes must be \('data', 'expert', 'tensor'\)"),
])
def test_a_mesh_or_dtype_that_cannot_work_is_refused_before_reading(hf_dir, kwargs, message):
    with pytest.raises(kimi_jax.KimiError, match=message):
        kimi_jax.load(hf_dir, progress=False, **kwargs)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(kimi_jax.KimiError, match=f"checkpoint directory '{tmp_path / 'nope'}' not found"):
        kimi_jax.load(tmp_path / "nope")


def test_a_load_reads_config_json_once(hf_dir, fixture_dir, monkeypatch):
    from kimi_jax.config import Config
    from kimi_jax.runtime import Runtime

    reads = []
    parse = Config.from_hf.__func__

    def counting(cls, source):
        reads.append(source)
        return parse(cls, source)

    monkeypatch.setattr(Config, "from_hf", classmethod(counting))
    kimi_jax.load(hf_dir, dtype="float32", progress=False)
    assert len(reads) == 1
    reads.clear()
    Runtime.load(str(fixture_dir("loading_int4_chat", CFG)), max_len=32, progress=False)
    assert len(reads) == 1


def test_the_default_checkpoint_belongs_to_the_runtime_whose_import_needs_no_jax():
    import subprocess
    import sys

    code = "import sys, kimi_jax.runtime as r; print(r.DEFAULT_CHECKPOINT); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [kimi_jax.DEFAULT_CHECKPOINT, "False"]
    assert out[0].endswith("checkpoints/kimi-k2-nano")
