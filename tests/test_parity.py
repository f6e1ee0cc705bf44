"""kimi_jax against transformers' DeepseekV3ForCausalLM on the same random checkpoints (fp32).

Each config variant covers a different branch of the K2 architecture: group-limited routing,
one or two dense layers, q LoRA on/off, YaRN with and without a cos/sin attention factor.
"""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import load_reference, reference_greedy, reference_logits

from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY, Yarn
from kimi_jax.engine import Engine
from kimi_jax.errors import KimiError
from kimi_jax.fixtures import with_fixture_token_ids
from kimi_jax.sampling import SamplingParams

VARIANTS = {
    # K2's own branch mix: one dense layer, q LoRA, no group limit, YaRN with beta 1/1.
    "k2_shape": TINY,
    # Group-limited routing (keep 2 of 4 groups), two dense layers, a single q_proj.
    "groups_two_dense_no_qlora": TINY.replace(n_group=4, topk_group=2, first_k_dense_replace=2,
                                               num_hidden_layers=4, q_lora_rank=None),
    # One group of two kept, q LoRA, DeepSeek's beta_fast 32 and mscale != mscale_all_dim (cos/sin factor).
    "groups_qlora_yarn_factor": TINY.replace(
        n_group=2, topk_group=1, rope_scaling=Yarn(factor=16.0, original_max_position_embeddings=32, beta_fast=32.0,
                                                   beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8)),
    # Plain rope, two shared experts, top-3 without normalization.
    "no_yarn_two_shared": TINY.replace(rope_scaling=None, n_shared_experts=2, num_experts_per_tok=3,
                                       norm_topk_prob=False, q_lora_rank=None),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, fixture_dir):
    cfg = with_fixture_token_ids(VARIANTS[request.param])
    path = fixture_dir(request.param, cfg, tokenizer=False)
    model, loaded_cfg = load_model(path, dtype=jnp.float32, progress=False)
    assert loaded_cfg == cfg
    return SimpleNamespace(
        cfg=cfg, model=model, ref=load_reference(path),
        engine=Engine(model, max_len=96, chunk=8, block=16),
        full=nnx.jit(lambda m, t: m.forward_no_cache(t)),
        rng=np.random.default_rng(abs(hash(request.param)) % 2**32),
    )


def _prompts(case, *lengths):
    return [case.rng.integers(0, case.cfg.vocab_size - 256, n).tolist() for n in lengths]


def test_logits_match_transformers(case):
    tokens = np.asarray(_prompts(case, 24, 24))
    ours = np.asarray(case.full(case.model, jnp.asarray(tokens)))
    ref = reference_logits(case.ref, tokens)
    assert np.abs(ref).max() > 1.0  # the fixture is not degenerate
    assert np.abs(ours - ref).max() <= TOL


def test_prefill_through_cache_matches_transformers(case):
    (prompt,) = _prompts(case, 21)
    logits, _ = case.engine.prefill([prompt])
    ref = reference_logits(case.ref, [prompt])[0, -1]
    assert np.abs(np.asarray(logits)[0] - ref).max() <= TOL


def test_greedy_continuation_of_32_tokens_matches_transformers(case):
    (prompt,) = _prompts(case, 7)
    gen = case.engine.generate([prompt], SamplingParams(max_new_tokens=32)).run()
    assert gen.finish_reasons == ["length"]
    assert gen.tokens[0] == reference_greedy(case.ref, prompt, 32)


def test_cached_decode_logits_equal_full_forward(case):
    (prompt,) = _prompts(case, 9)
    gen = case.engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=1.0, seed=5))
    step_logits = []
    for _ in gen:
        step_logits.append(np.asarray(gen.last_logits)[0])
    seq = prompt + gen.tokens[0]
    full = np.asarray(case.full(case.model, jnp.asarray([seq])))[0]
    # After the token at position len(prompt)+s is fed back, the decode step predicts the next one.
    for s, logits in enumerate(step_logits[:-1]):
        assert np.abs(logits - full[len(prompt) + s]).max() <= TOL, f"decode step {s}"


def test_chunked_prefill_equals_one_shot(case):
    (prompt,) = _prompts(case, 30)  # four chunks of 8, the last one partial
    chunked, cache = case.engine.prefill([prompt])
    one_shot = Engine(case.model, max_len=96, chunk=32, block=16)
    whole, cache2 = one_shot.prefill([prompt])
    assert np.abs(np.asarray(chunked) - np.asarray(whole)).max() <= TOL
    n = len(prompt)
    assert np.abs(np.asarray(cache.c_kv[:, :, :n]) - np.asarray(cache2.c_kv[:, :, :n])).max() <= TOL


def test_each_prompt_of_a_batch_equals_the_prompt_alone(case):
    prompts = _prompts(case, 3, 11, 17)
    batch_logits, _ = case.engine.prefill(prompts)
    batch = case.engine.generate(prompts, SamplingParams(max_new_tokens=10)).run()
    for row, prompt in enumerate(prompts):
        alone_logits, _ = case.engine.prefill([prompt])
        assert np.abs(np.asarray(batch_logits)[row] - np.asarray(alone_logits)[0]).max() <= TOL
        alone = case.engine.generate([prompt], SamplingParams(max_new_tokens=10)).run()
        assert batch.tokens[row] == alone.tokens[0]


def test_prompts_of_any_length_reuse_one_compiled_prefill_and_decode(fixture_dir):
    cfg = with_fixture_token_ids(TINY)
    model, _ = load_model(fixture_dir("k2_shape", cfg, tokenizer=False), dtype=jnp.float32, progress=False)
    engine = Engine(model, max_len=64, chunk=8, block=16)
    rng = np.random.default_rng(0)
    for lengths in ((1, 5), (9, 30), (17, 2), (40, 40)):
        prompts = [rng.integers(0, 200, n).tolist() for n in lengths]
        engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9)).run()
    assert engine.compile_counts() == {"prefill": 1, "decode": 1, "sample": 1}


def test_generation_stops_at_stop_token_and_at_cache_capacity(case):
    (prompt,) = _prompts(case, 5)
    free = case.engine.generate([prompt], SamplingParams(max_new_tokens=12)).run()
    stop_at = free.tokens[0][4]
    stopped = case.engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_ids=(stop_at,))).run()
    first = free.tokens[0].index(stop_at)
    assert stopped.tokens[0] == free.tokens[0][:first + 1] and stopped.finish_reasons == ["stop"]
    # 96-slot cache, 90-token prompt: only 6 tokens fit (the last one sampled but not cached).
    (long_prompt,) = _prompts(case, 90)
    full = case.engine.generate([long_prompt], SamplingParams(max_new_tokens=50)).run()
    assert full.finish_reasons == ["length"] and len(full.tokens[0]) == 7


def test_bad_prompts_raise_readable_errors(case):
    with pytest.raises(KimiError, match="empty prompt"):
        case.engine.prefill([[]])
    with pytest.raises(KimiError, match="cache holds 96"):
        case.engine.prefill([[1] * 97])
