"""The nano training pipeline: QAT trains on exactly the served weights, and the scripts run end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts_loader import load_script

from kimi_jax import generate
from kimi_jax.quant import Int4Weight, is_routed_expert, quantize

fake_quantize = load_script("train_nano").fake_quantize


@pytest.mark.parametrize("shape,group", [((64, 48), 32), ((3, 96, 16), 32), ((32, 8), 16)])
def test_fake_quantized_weights_are_bit_identical_to_the_exported_int4(shape, group):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 2.0, shape[:-2] + (1, shape[-1]))).astype(np.float32)
    w[..., :group, 0] = 0.0  # an all-zero group takes the eps scale in both
    served = np.swapaxes(np.asarray(quantize(w, group).dequantize(jnp.float32)), -1, -2)
    trained = np.asarray(fake_quantize(jnp.asarray(w), group))
    np.testing.assert_array_equal(trained, served)


def test_fake_quantization_passes_gradients_straight_through():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 8)), jnp.float32)
    grad = jax.grad(lambda w: jnp.sum(fake_quantize(w, 32) * jnp.arange(8.0)))(w)
    np.testing.assert_array_equal(np.asarray(grad), np.broadcast_to(np.arange(8.0), (32, 8)))


def test_data_tokenizer_training_and_export_run_end_to_end(tmp_path, capsys):
    # The shipped model's recipe at toy size: every script, the QAT phase and the export through
    # the official INT4 layout; the result loads and generates through the normal CLI.
    data, tok, out = tmp_path / "data", tmp_path / "tok", tmp_path / "nano"
    load_script("make_agent_data").main(["--out", str(data), "--n-train", "160", "--n-eval", "8"])
    load_script("build_tokenizer").main(["--data", str(data), "--out", str(tok), "--ranks", "768"])
    rc = load_script("train_nano").main([
        "--data", str(data), "--tokenizer", str(tok), "--out", str(out), "--float-out", str(tmp_path / "float"),
        "--cache", str(tmp_path / "cache"), "--steps", "4", "--qat-steps", "2", "--batch", "2", "--log-every", "1"])
    assert rc == 0
    log = capsys.readouterr().err
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if line.startswith("step")]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert json.loads((out / "training.json").read_text())["args"]["qat_steps"] == 2

    from flax import nnx

    from kimi_jax.checkpoint import load_model

    model, cfg = load_model(str(out), progress=False)
    experts = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model)) if is_routed_expert(p, v)]
    assert len(experts) == 3 and all(isinstance(w, Int4Weight) for w in experts)
    assert generate.main(["--checkpoint", str(out), "--prompt", "What is 2 + 2?", "--max-new-tokens", "4",
                          "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
