"""kimi_jax against transformers' DeepseekV3ForCausalLM on the same random checkpoints (fp32); what the
engine does beyond the numbers (batching, blocks, stopping) is test_engine.py.

Each config variant covers a different branch of the K2 architecture: group-limited routing,
one or two dense layers, q LoRA on/off, YaRN with and without a cos/sin attention factor.
"""

import zlib
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from paged import Rows

from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY, Yarn
from kimi_jax.engine import BatchEngine
from kimi_jax.fixtures import with_fixture_token_ids
from kimi_jax.reference import load_reference, reference_greedy, reference_logits
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


_CASES = {}


def _case(name, fixture_dir):
    if name not in _CASES:
        cfg = with_fixture_token_ids(VARIANTS[name])
        path = fixture_dir(name, cfg, tokenizer=False)
        model, loaded_cfg = load_model(path, dtype=jnp.float32, progress=False)
        assert loaded_cfg == cfg
        _CASES[name] = SimpleNamespace(
            cfg=cfg, model=model, ref=load_reference(path),
            engine=BatchEngine(model, max_batch=4, max_len=96, chunk=8, page_size=4),
            full=nnx.jit(lambda m, t: m.forward_no_cache(t)),
            rng=np.random.default_rng(zlib.crc32(name.encode())),
        )
    return _CASES[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, fixture_dir):
    """Each architecture variant: the numerics tests run on all of them."""
    return _case(request.param, fixture_dir)


def _prompts(case, *lengths):
    return [case.rng.integers(0, case.cfg.vocab_size - 256, n).tolist() for n in lengths]


def test_logits_match_transformers(case):
    tokens = np.asarray(_prompts(case, 24, 24))
    ours = np.asarray(case.full(case.model, jnp.asarray(tokens)))
    ref = reference_logits(case.ref, tokens)
    assert np.abs(ref).max() > 1.0  # the fixture is not degenerate
    assert np.abs(ours - ref).max() <= TOL


def test_prefill_through_the_paged_cache_matches_transformers(case):
    (prompt,) = _prompts(case, 21)
    logits = Rows(case.model, 1, 96).prefill([prompt], chunk=8)
    ref = reference_logits(case.ref, [prompt])[0, -1]
    assert np.abs(logits[0] - ref).max() <= TOL


def test_greedy_continuation_of_32_tokens_matches_transformers(case):
    (prompt,) = _prompts(case, 7)
    (req,) = case.engine.generate([prompt], SamplingParams(max_new_tokens=32))
    assert req.finish_reason == "length"
    assert req.tokens == reference_greedy(case.ref, prompt, 32)


def test_cached_decode_logits_equal_full_forward(case):
    (prompt,) = _prompts(case, 9)
    rows = Rows(case.model, 1, 96)
    logits = [rows.prefill([prompt], chunk=8)[0]]
    seq = list(prompt)
    for _ in range(20):  # cross several 4-token pages
        seq.append(int(np.argmax(logits[-1])))
        logits.append(rows.decode([seq[-1]])[0])
    full = np.asarray(case.full(case.model, jnp.asarray([seq])))[0]
    for s, step_logits in enumerate(logits):
        assert np.abs(step_logits - full[len(prompt) - 1 + s]).max() <= TOL, f"step {s}"


def test_chunked_prefill_equals_one_shot(case):
    (prompt,) = _prompts(case, 30)  # four chunks of 8, the last one partial
    chunked, whole = Rows(case.model, 1, 96, seed=1), Rows(case.model, 1, 96, seed=2)
    assert np.abs(chunked.prefill([prompt], chunk=8) - whole.prefill([prompt], chunk=32)).max() <= TOL
    assert np.abs(chunked.latents(0, 30) - whole.latents(0, 30)).max() <= TOL
