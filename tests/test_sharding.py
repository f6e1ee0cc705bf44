"""Expert and tensor parallelism on 8 CPU devices: the same numbers as one device; one-line errors
for meshes that do not fit; the memory planner; two processes acting as one."""

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from paged import Rows

from kimi_jax import fixtures, generate, plan
from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.engine import BatchEngine
from kimi_jax.errors import KimiError
from kimi_jax.sampling import SamplingParams
from kimi_jax.sharding import MeshSpec, make_mesh

CONFIGS = {
    "bf16": fixtures.with_fixture_token_ids(TINY),
    "int4": fixtures.with_fixture_token_ids(TINY.replace(quantization=Int4Quant(group_size=16))),
}
MESHES = ["data=1,expert=8,tensor=1", "data=1,expert=4,tensor=2", "data=2,expert=2,tensor=2"]
PROMPTS = [list(range(3, 14)), list(range(40, 45))]


_SINGLE = {}


@pytest.fixture(scope="module")
def one_device(fixture_dir):
    """name -> (checkpoint, prefill logits and greedy tokens on one device), each computed once."""
    def get(name):
        if name not in _SINGLE:
            path = fixture_dir(f"mesh_{name}", CONFIGS[name], tokenizer=False)
            model, _ = load_model(path, dtype=jnp.float32, progress=False)
            logits = Rows(model, 2, 64).prefill(PROMPTS, chunk=8)
            engine = BatchEngine(model, max_batch=2, max_len=64, chunk=8, page_size=4)
            tokens = [r.tokens for r in engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))]
            _SINGLE[name] = path, logits, tokens
        return _SINGLE[name]
    return get


@pytest.fixture(scope="module")
def single(one_device):
    """The INT4 checkpoint, the product's own format: the tests beyond the numerics use it."""
    return one_device("int4")


# INT4 on every mesh; bf16 (the dense-expert path) on the mesh that splits all three axes.
@pytest.mark.slow
@pytest.mark.parametrize("name, mesh_text", [("int4", m) for m in MESHES] + [("bf16", MESHES[2])])
def test_sharded_model_matches_one_device(one_device, name, mesh_text):
    path, logits, tokens = one_device(name)
    mesh = make_mesh(MeshSpec.parse(mesh_text))
    model, _ = load_model(path, dtype=jnp.float32, mesh=mesh, progress=False)
    sharded_logits = Rows(model, 2, 64, mesh=mesh).prefill(PROMPTS, chunk=8)
    assert np.abs(sharded_logits - logits).max() <= 1e-5
    engine = BatchEngine(model, max_batch=2, max_len=64, chunk=8, page_size=4, mesh=mesh)
    assert [r.tokens for r in engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))] == tokens


def test_mesh_flag_of_the_cli(single, capsys):
    path, _, tokens = single
    argv = ["--checkpoint", str(path), "--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "12",
            "--dtype", "float32", "--json", "--mesh", "expert=4,tensor=2"]
    assert generate.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == tokens[0]


@pytest.mark.parametrize("text, message", [
    ("data=1,expert=4", "needs 4 devices, but 8 are available"),
    ("tensor=8", "dimension 'heads' of size 4 is not divisible by mesh axis 'tensor' of size 8"),
    ("expert=8,bogus=1", "'bogus=1' is not AXIS=SIZE"),
    ("expert=two", "size of 'expert' must be an integer"),
])
def test_meshes_that_do_not_fit_are_named(single, text, message):
    path, _, _ = single
    with pytest.raises(KimiError, match=message):
        load_model(path, mesh=make_mesh(MeshSpec.parse(text)), progress=False)


def test_slots_not_divisible_by_the_data_axis_are_refused(single):
    path, _, _ = single
    mesh = make_mesh(MeshSpec.parse("data=2,expert=4"))
    model, _ = load_model(path, dtype=jnp.float32, mesh=mesh, progress=False)
    with pytest.raises(KimiError, match="max_batch 1 must be a multiple of the mesh's data axis \\(2\\)"):
        BatchEngine(model, max_batch=1, max_len=64, chunk=8, mesh=mesh)


@pytest.mark.slow
def test_memory_plan_of_a_mid_size_config(tmp_path, capsys):
    cfg = TINY.replace(hidden_size=512, num_hidden_layers=2, n_routed_experts=16, moe_intermediate_size=256,
                       intermediate_size=1024, vocab_size=4096, max_position_embeddings=4096,
                       quantization=Int4Quant())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert plan.main(["--config", str(tmp_path / "config.json"), "--target", "cpu", "--devices", "8",
                      "--max-len", "4096", "--hbm-gb", "0.03", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    # Without --mesh every split of the 8 devices is a candidate (this config's 4 heads allow
    # tensor <= 4); the one leaving the longest context wins, and every other says why it lost.
    meshes = {m["mesh"]: m for m in p["meshes"]}
    assert set(meshes) == {"data=1,expert=2,tensor=4", "data=1,expert=4,tensor=2", "data=1,expert=8,tensor=1"}
    best = p["best"]
    assert best["verdict"] == "best" and best["fits"]["1"] == max(m["fits"]["1"] or 0 for m in p["meshes"]
                                                                  if m["fits"])
    assert all(m["verdict"] for m in p["meshes"])
    # The engine's own pool: the slot's 4096-token sequence and as much again for cached prefixes,
    # in 64-token pages, plus the discard page; (kv_lora + rope) bf16 per token and layer, plus the
    # page table and lengths
    assert (best["pages"], best["page_size"]) == (129, 64)
    assert best["cache_bytes"] == cfg.num_hidden_layers * 129 * 64 * (32 + 8) * 2 + 64 * 4 + 4
    assert 0 < best["expert_weight_bytes"] < best["weight_bytes"]
    assert best["prefill_temp_bytes"] > 0 and best["decode_temp_bytes"] > 0
    assert best["temporaries_from"] == "compiled for XLA:CPU, all 2 layers"
    assert best["fits"]["1"] > best["fits"]["8"] > 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(path, port, pid, timeout=60):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "kimi_jax.generate", "--checkpoint", str(path), "--prompt-ids",
           ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "12", "--dtype", "float32", "--json",
           "--mesh", "data=1,expert=4,tensor=2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
           "--process-id", str(pid), "--coordinator-timeout", str(timeout)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_generate_the_same_tokens_as_one(single):
    path, _, tokens = single
    port = _free_port()
    procs = [_spawn(path, port, pid) for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert json.loads(outs[0][0])["token_ids"] == tokens[0]  # process 0 prints one JSON object
    assert outs[1][0] == ""  # the other prints nothing


def test_unreachable_coordinator_times_out_with_a_clear_error(single):
    path, _, _ = single
    proc = _spawn(path, _free_port(), 1, timeout=5)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert "could not join the run at coordinator 127.0.0.1:" in err.strip().splitlines()[-1]
