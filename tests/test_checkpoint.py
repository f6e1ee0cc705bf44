"""Checkpoint directories: bad input names the file and tensor; converted dirs restore exactly."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax import export, fixtures
from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY
from kimi_jax.errors import CheckpointError, KimiError

CFG = fixtures.with_fixture_token_ids(TINY)
VICTIM = "model.layers.1.self_attn.kv_b_proj.weight"


def _write(path, cfg=CFG, edit=None, **kw):
    tensors = dict(fixtures.random_hf_tensors(cfg, seed=1))
    if edit:
        edit(tensors)
    export.write_checkpoint(path, cfg, tensors.items(), max_shard_bytes=1 << 16, **kw)
    return path


def test_missing_tensor_is_named(tmp_path):
    _write(tmp_path, edit=lambda t: t.pop(VICTIM))
    with pytest.raises(CheckpointError, match=f"tensor '{VICTIM}' is missing"):
        load_model(tmp_path, progress=False)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    def edit(t):
        t[VICTIM] = t[VICTIM][:-1]
    _write(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor '" + VICTIM + "' has shape"):
        load_model(tmp_path, progress=False)


def test_wrong_dtype_is_named(tmp_path):
    def edit(t):
        t[VICTIM] = t[VICTIM].astype(np.int32)
    _write(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match="has dtype I32, expected BF16 or F16 or F32"):
        load_model(tmp_path, progress=False)


def test_truncated_and_missing_shards_are_named(tmp_path):
    _write(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"][VICTIM]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file, truncated"):
        load_model(tmp_path, progress=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in the index is missing"):
        load_model(tmp_path, progress=False)


def test_missing_directory_and_config_are_reported(tmp_path):
    with pytest.raises(KimiError, match="not found"):
        load_model(tmp_path / "nope", progress=False)
    with pytest.raises(KimiError, match="config.json: file not found"):
        load_model(tmp_path, progress=False)


def test_converted_checkpoint_restores_the_same_parameters(tmp_path):
    from kimi_jax.convert import convert, is_converted, load_converted

    src = _write(tmp_path / "hf")
    convert(str(src), str(tmp_path / "conv"), dtype=jnp.float32, progress=False)
    assert is_converted(str(tmp_path / "conv")) and not is_converted(str(src))
    for name in ("config.json", "generation_config.json"):
        assert os.path.isfile(tmp_path / "conv" / name)
    a, cfg = load_model(src, dtype=jnp.float32, progress=False)
    b = load_converted(str(tmp_path / "conv"), cfg, dtype=jnp.float32)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        assert pa == pb
        assert np.array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value())), pa
    with pytest.raises(KimiError, match="exists and is not empty"):
        convert(str(src), str(tmp_path / "conv"), progress=False)
