"""`python -m kimi_jax.plan` for GPU hosts planned without their GPUs (the activation model, no
compile): the target's memory, the mesh it picks and why the others lose, the context that fits,
and one error line for bad input. The compiled paths are tested in test_sharding.py (XLA:CPU) and
test_tpu_compile.py (libtpu)."""

import json
import math

import pytest

from kimi_jax import plan
from kimi_jax.cache import POOL_SEQUENCES_PER_SLOT
from kimi_jax.planner.targets import GPUS, JAX_GPU_MEMORY_FRACTION

TENSOR8 = "data=1,expert=1,tensor=8"


@pytest.fixture(autouse=True)
def jax_default_fraction(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)


def run_json(capsys, *args):
    assert plan.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_without_gpus_the_default_plan_is_an_8_gpu_h200_host_from_the_activation_model(capsys):
    assert plan.main([]) == 0
    out, err = capsys.readouterr()
    assert "no GPU or TPU here: planning for --target h200" in err
    assert "activation model" in err and "total " in err
    lines = out.splitlines()
    assert lines[0] == "k2-thinking on 8 x NVIDIA H200, bfloat16, batch 1, --max-len 262,144"
    assert lines[1].startswith("memory per device for XLA: 113.07 GB, 0.75 (XLA_PYTHON_CLIENT_MEM_FRACTION, "
                               "JAX's default) of the 143,771 MiB an H200 reports")
    # Tensor parallelism splits everything 8 ways; expert parallelism replicates attention and the
    # dense layer, so every other mesh holds more weights per device and leaves less room.
    assert lines[2].startswith(f"mesh {TENSOR8}: best, ")
    assert {line.split(":")[0] for line in lines[3:6]} == {
        "mesh data=1,expert=2,tensor=4", "mesh data=1,expert=4,tensor=2", "mesh data=1,expert=8,tensor=1"}
    assert all("even with no temporaries" in line for line in lines[3:6])
    assert "| weights (routed experts) | 76.18 GB (71.35 GB) |" in out
    assert "temporaries: activation model" in out
    assert "longest context per sequence: batch 1: " in out


def test_the_longest_context_is_what_weights_and_temporaries_leave_for_the_engines_pool(capsys):
    p = run_json(capsys, "--target", "b200", "--batch", "4")
    best = p["best"]
    assert p["memory_bytes"] == GPUS["b200"].memory * JAX_GPU_MEMORY_FRACTION
    free = p["memory_bytes"] - best["weight_bytes"] - max(best["prefill_temp_bytes"], best["decode_temp_bytes"])
    per_token = best["cache_bytes_per_token_per_row"] * POOL_SEQUENCES_PER_SLOT
    for batch, tokens in best["fits"].items():
        assert tokens == math.floor(free / (per_token * int(batch)))
    # K2's 61 layers x 576 bf16 values, per token of context, on every device of a tensor=8 mesh
    assert best["cache_bytes_per_token_per_row"] == 61 * 576 * 2
    assert best["temporaries_from"].startswith("activation model")
    # Decode temporaries grow with the rows decoded together; a prefill chunk is one row.
    one = run_json(capsys, "--target", "b200", "--batch", "1")["best"]
    assert best["decode_temp_bytes"] > one["decode_temp_bytes"]
    assert best["prefill_temp_bytes"] == one["prefill_temp_bytes"]


def test_a_mesh_that_cannot_win_even_without_temporaries_is_not_modelled(capsys):
    p = run_json(capsys, "--target", "h200")
    skipped = [m for m in p["meshes"] if "even with no temporaries" in m["verdict"]]
    assert skipped and all(m["prefill_temp_bytes"] is None for m in skipped)
    assert p["best"]["mesh"] == TENSOR8


def test_h100s_hold_k2_only_with_more_than_jaxs_default_share_of_each_gpu(capsys, monkeypatch):
    assert plan.main(["--target", "h100"]) == 0
    out = capsys.readouterr().out
    assert "k2-thinking does not fit 8 x NVIDIA H100 on any mesh" in out
    assert "weights 76.18 GB per device exceed the 64.14 GB available" in out
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the environment gives XLA more of each GPU" in out
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    p = run_json(capsys, "--target", "h100")
    assert p["best"]["mesh"] == TENSOR8 and 0 < p["best"]["fits"]["1"] < 262144
    assert [m["mesh"] for m in p["meshes"] if "exceed" in m["verdict"]] == [
        "data=1,expert=4,tensor=2", "data=1,expert=8,tensor=1"]


def test_a_given_mesh_is_planned_alone(capsys):
    p = run_json(capsys, "--target", "h200", "--mesh", "expert=8")
    assert [m["mesh"] for m in p["meshes"]] == ["data=1,expert=8,tensor=1"]
    assert p["best"]["weight_bytes"] > 94e9


@pytest.mark.parametrize("args,env,message", [
    (["--target", "a100"], None, "error: --target a100: not one of h100, h200, b200, a TPU topology"),
    (["--max-len", "300000"], None, "error: --max-len 300000 exceeds the model's max_position_embeddings 262144"),
    (["--target", "h200", "--mesh", "tensor=4"], None, "error: --mesh tensor=4 spans 4 devices; 8 x NVIDIA H200 has 8"),
    (["--target", "h200"], "2", "error: XLA_PYTHON_CLIENT_MEM_FRACTION='2' must be in (0, 1]"),
    (["--write"], None, "error: --write goes with --table"),
    (["--batch", "0"], None, "error: --devices, --batch and --max-len must be >= 1"),
    (["--target", "local"], None, "error: --target local: this machine has no GPU or TPU"),
])
def test_bad_input_is_one_error_line_and_status_2(capsys, monkeypatch, args, env, message):
    if env:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", env)
    assert plan.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1].startswith(message)
