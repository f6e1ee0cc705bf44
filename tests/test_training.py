"""The nano training pipeline: QAT trains on exactly the served weights, the loss sees exactly the
model's own outputs, batches and checkpoints make a resumed run identical to an uninterrupted one,
and the scripts run end to end into a checkpoint the runtime serves."""

import json
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts_loader import load_script

from kimi_jax import generate
from kimi_jax.chat import ChatTemplate, Tokenizer, format_output
from kimi_jax.quant import Int4Weight, is_routed_expert, quantize

tn = load_script("train_nano")
npk = load_script("nano_packing")
mad = load_script("make_agent_data")


@pytest.mark.parametrize("shape,group", [((48, 64), 32), ((3, 16, 96), 32), ((8, 32), 16)])
def test_fake_quantized_weights_are_bit_identical_to_the_exported_int4(shape, group):
    rng = np.random.default_rng(0)  # weights [..., out, in], groups along in
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 2.0, shape[:-1] + (1,))).astype(np.float32)
    w[..., 0, :group] = 0.0  # an all-zero group takes the eps scale in both
    served = np.asarray(quantize(w, group).dequantize(jnp.float32))
    trained = np.asarray(tn.fake_quantize(jnp.asarray(w), group))
    np.testing.assert_array_equal(trained, served)


def test_fake_quantization_passes_gradients_straight_through():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 32)), jnp.float32)
    grad = jax.grad(lambda w: jnp.sum(tn.fake_quantize(w, 32) * jnp.arange(8.0)[:, None]))(w)
    np.testing.assert_array_equal(np.asarray(grad), np.broadcast_to(np.arange(8.0)[:, None], (8, 32)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Data and a tokenizer at toy size, shared by the tests below."""
    root = tmp_path_factory.mktemp("nano")
    data, tok = root / "data", root / "tok"
    assert mad.main(["--out", str(data), "--n-train", "240", "--n-heldout", "18", "--n-multistep", "6",
                     "--n-paraphrase", "11", "--n-ood", "4"]) == 0
    assert load_script("build_tokenizer").main(["--data", str(data), "--out", str(tok), "--ranks", "600"]) == 0
    return root, data, tok


def test_each_turn_sample_trains_on_exactly_the_assistant_outputs_of_that_turn(pipeline):
    _, data, tok_dir = pipeline
    tokenizer, template = Tokenizer.from_dir(tok_dir), ChatTemplate.default()
    items = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    multi_turn = 0
    for item in items[:60]:
        samples = tn.turn_samples(item, tokenizer, template)
        users = [i for i, m in enumerate(item["messages"]) if m["role"] == "user"]
        assert len(samples) == len(users)
        multi_turn += len(users) > 1
        for t, (ids, mask) in enumerate(samples):
            end = users[t + 1] if t + 1 < len(users) else len(item["messages"])
            outputs = [format_output(m) for m in item["messages"][users[t]:end] if m["role"] == "assistant"]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
            spans = [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
            assert spans == outputs, item["id"]
    assert multi_turn


def toy_model(vocab=300):
    from kimi_jax.config import Config, Yarn

    cfg = Config(vocab_size=vocab, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1,
                 routed_scaling_factor=2.8, rope_theta=50000.0,
                 rope_scaling=Yarn(factor=4.0, original_max_position_embeddings=256), max_position_embeddings=1024,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, quantization=None,
                 **tn.MODEL_SIZES["toy"])
    return tn.build_float_model(cfg, 0)


def flat(samples):
    tokens = np.concatenate(samples).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in samples])])
    return tokens, (tokens % 3 == 0).astype(np.uint8), offsets


def test_packed_rows_give_every_sample_exactly_the_logits_it_gets_alone():
    # Samples that start with the shared prefix are stored without it and read it once per batch;
    # the others are stored whole; several share a row. Neither may see the other samples.
    model = toy_model()
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 300, 37).astype(np.int32)
    samples = [np.concatenate([prefix, rng.integers(3, 300, n)]) if shared else rng.integers(3, 300, n)
               for n, shared in ((20, True), (15, False), (30, True), (9, False), (25, True))]
    batches = npk.PackedBatches(*flat(samples), prefix, 64, 2, seed=0, shuffle=False)
    assert batches.shared.tolist() == [True, False, True, False, True] and batches.lengths.tolist() == [20, 15, 30, 9, 25]
    batch = batches.next()
    logits = npk.packed_forward(model, *(jnp.asarray(batch[k]) for k in ("prefix", "tokens", "positions", "segments",
                                                                          "shared")))
    seen = 0
    for r, row in enumerate(batches.plan[0]):
        at = 0
        for i in row:
            n = batches.lengths[i]
            alone = np.asarray(model.forward_no_cache(jnp.asarray(samples[i][None].astype(np.int32))))[0, -n:]
            np.testing.assert_allclose(np.asarray(logits)[r, at:at + n], alone, atol=2e-6)
            at, seen = at + n, seen + 1
    assert seen == len(samples)


def test_packing_fills_rows_once_per_epoch_and_replays_from_a_saved_position():
    rng = np.random.default_rng(1)
    prefix = np.arange(3, 13, dtype=np.int32)
    samples = [np.concatenate([prefix, rng.integers(20, 99, n)]) if rng.random() < 0.6 else rng.integers(20, 99, n)
               for n in rng.integers(5, 60, 200)]
    samples.append(rng.integers(20, 99, 90))  # longer than a row: dropped
    a = npk.PackedBatches(*flat(samples), prefix, 64, 4, seed=3)
    assert a.dropped == 1 and a.fill > 0.9
    packed = [i for batch in a.plan for row in batch for i in row]
    assert len(packed) == len(set(packed)) > 0.9 * len(samples)
    assert all(sum(a.lengths[i] for i in row) <= 64 for batch in a.plan for row in batch)
    seen = [a.next() for _ in range(len(a.plan) + 3)]  # crosses into the second epoch
    first = seen[0]
    segment_starts = np.flatnonzero(np.diff(first["segments"][0], prepend=0) > 0)
    assert len(segment_starts) > 1  # several samples to a row, each at its own positions
    assert all(first["positions"][0, s] == (len(prefix) if first["shared"][0, s] else 0) for s in segment_starts)
    b = npk.PackedBatches(*flat(samples), prefix, 64, 4, seed=3)
    for _ in range(5):
        b.next()
    resumed = npk.PackedBatches(*flat(samples), prefix, 64, 4, seed=3, position=b.position)
    for expected in seen[5:]:
        got = resumed.next()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_a_time_budget_resizes_the_plan_as_the_pace_changes():
    plan = tn.Plan(1000, 200, 1e-3)
    plan.fit(100, seconds_left=500.0, rate=1.0)  # 600 steps fit: both phases shrink alike
    assert (plan.steps, plan.qat_steps) == (500, 100)
    plan.fit(200, seconds_left=2000.0, rate=1.0)  # faster again: back up, but never past the first plan
    assert (plan.steps, plan.qat_steps) == (1000, 200)
    plan.fit(1050, seconds_left=50.0, rate=1.0)  # in the QAT phase only it changes
    assert (plan.steps, plan.qat_steps) == (1000, 100)
    plan.fit(1090, seconds_left=0.0, rate=1.0)  # out of time: ends at the current step
    assert plan.total == 1090
    late = tn.Plan(1000, 200, 1e-3)
    late.fit(400, seconds_left=10.0, rate=1.0, compile_allowance=20.0)  # the QAT compile no longer fits
    assert late.steps == 400 and late.qat_steps == 1


def test_a_train_state_round_trips_and_a_mismatched_one_is_refused(tmp_path):
    trees = ({"w": jnp.arange(6.0).reshape(2, 3)}, (jnp.int32(7), [jnp.ones(4)]))
    tn.save_train_state(tmp_path, trees, {"step": 5})
    zeros = jax.tree.map(jnp.zeros_like, trees)
    restored, meta = tn.load_train_state(tmp_path, zeros)
    assert meta == {"step": 5}
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(trees)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 3\), the model expects \(3, 2\)"):
        tn.load_train_state(tmp_path, ({"w": jnp.zeros((3, 2))}, zeros[1]))


@pytest.fixture
def compile_cache(tmp_path):
    """The three training runs below compile the same programs: let the later ones load them."""
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.mark.slow
def test_training_runs_end_to_end_resumes_exactly_and_exports_a_servable_checkpoint(pipeline, capsys, compile_cache):
    # The shipped model's recipe at toy size: both phases, the export through the official INT4
    # layout, a run split by --stop-after/--resume that ends with the same weights, and the result
    # generating through the normal CLI.
    root, data, tok = pipeline
    common = ["--data", str(data), "--tokenizer", str(tok), "--cache", str(root / "cache"), "--size", "toy",
              "--steps", "4", "--qat-steps", "2", "--batch", "2", "--row-len", "512", "--log-every", "1",
              "--checkpoint-every", "0"]

    def run(name, *extra):
        out = root / name
        assert tn.main([*common, "--out", str(out / "qat"), "--float-out", str(out / "float"),
                        "--train-state", str(out / "state"), *extra]) == 0
        return out

    straight = run("straight")
    log = capsys.readouterr().err
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if line.startswith("step")]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert "float model: eval loss" in log and json.loads((straight / "qat" / "training.json").read_text())[
        "args"]["qat_steps"] == 2

    run("split", "--stop-after", "3")
    assert not (root / "split" / "qat").exists() and "continue with --resume" in capsys.readouterr().err
    split = run("split", "--resume")
    assert "resumed from" in capsys.readouterr().err
    for kind in ("qat", "float"):
        shard = "model-00001-of-000001.safetensors"
        assert (split / kind / shard).read_bytes() == (straight / kind / shard).read_bytes(), kind

    from flax import nnx

    from kimi_jax.checkpoint import load_model

    model, cfg = load_model(str(straight / "qat"), progress=False)
    experts = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model)) if is_routed_expert(p, v)]
    assert len(experts) == 3 * cfg.n_moe_layers and all(isinstance(w, Int4Weight) for w in experts)
    assert generate.main(["--checkpoint", str(straight / "qat"), "--prompt", "What is 2 + 2?",
                          "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # an untrained toy may stop early: at most the 4 asked for
    assert 0 < len(out["token_ids"]) <= 4 and out["stop_reason"] in ("answer", "length")


def test_the_gpu_pipeline_packs_results_into_parts_that_reassemble(tmp_path, monkeypatch):
    pipeline_script = load_script("nano_pipeline")
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(5000)
    (work / "ckpt" / "model.safetensors").write_bytes(payload)
    (work / "pipeline.log").write_text("trained\n")
    monkeypatch.setattr(pipeline_script, "PART_BYTES", 2048)
    parts = pipeline_script.pack(str(work), ["ckpt", "pipeline.log"], str(tmp_path / "out"))
    assert len(parts) > 2 and all(os.path.getsize(p) <= 2048 for p in parts)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(open(p, "rb").read() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    assert (tmp_path / "back" / "nano" / "ckpt" / "model.safetensors").read_bytes() == payload
    assert "jax" in pipeline_script.check_packages()
