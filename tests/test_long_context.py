"""Parity with transformers at 16K tokens, with K2's exact rotary settings (slow set).

The checkpoint is kimi_jax.fixtures.LONG_CONTEXT (64 rope dims, theta 50,000, YaRN 64 over 4,096)
written with a rope gain of 4, so attention is peaked and follows relative position: a rotation off
by 0.001 rad at position 16K moves logits by a tenth. Both layers are dense, so the only
discontinuity of the model (which experts a token is routed to) cannot turn a 1e-6 difference into
a different expert. The prompt repeats short motifs, so keys of equal content sit at many distances.

Logits are compared at all 16,384 positions, not only the last: at the first positions a query sees
one or two keys, and a softmax over one key does not depend on the rotation at all.

How the test reaches 16K tokens with the public API only: `forward_no_cache` gives the logits of
every position in one call (it attends over the sequence in blocks of 2,048 keys, 0.4 GB of
temporaries here); the reference prefills in chunks of 2,048 into its cache. The engine's own path
(chunked prefill into the paged cache, cached decode) is checked by greedy tokens.

transformers computes one of K2's frequencies one ulp differently from kimi_jax (its CPU float32 power
is not correctly rounded there; docs/k2-format.md §4.3, tests/test_rope.py), which at this gain moves
logits by up to 0.03 at 16K. The reference here therefore runs transformers' own frequency formula
with a correctly rounded power, so the comparison stays sharp (float32 rounding only).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rotary_reference import correctly_rounded_frequencies

import kimi_jax
from kimi_jax import mla
from kimi_jax.config import TINY
from kimi_jax.fixtures import LONG_CONTEXT, motif_prompt
from kimi_jax.model import KimiK2
from kimi_jax.reference import load_reference, reference_decode_greedy, reference_prefill_chunked

TOKENS = 16_384
CHUNK = 2048
NEW = 8
CFG = LONG_CONTEXT.replace(first_k_dense_replace=LONG_CONTEXT.num_hidden_layers)
# Float32 rounding alone, amplified by the peaked attention, reaches 0.0015 here; rotations that
# differ by one ulp in the frequencies (0.001 rad at 16K) give 0.03 to 0.24.
TOL = 0.005


@pytest.fixture(scope="module")
def run(fixture_dir):
    path = fixture_dir("long_context_dense", CFG, tokenizer=False, rope_gain=4.0)
    prompt = motif_prompt(CFG, TOKENS, seed=1)
    model = kimi_jax.load(path, dtype="float32", progress=False)
    ours = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, jnp.asarray([prompt])))[0]
    reference = load_reference(path)
    reference.model.rotary_emb.inv_freq.copy_(correctly_rounded_frequencies(CFG))
    cache, theirs = reference_prefill_chunked(reference, prompt, CHUNK, keep=np.arange(TOKENS))
    ref_tokens, margins = reference_decode_greedy(reference, cache, theirs[-1], NEW)
    return dict(model=model, prompt=prompt, ours=ours, theirs=theirs, ref_tokens=ref_tokens, margins=margins)


@pytest.mark.slow
def test_logits_at_every_position_of_a_16k_prompt_match_transformers(run):
    diff = np.abs(run["ours"] - run["theirs"]).max(-1)
    assert np.abs(run["theirs"]).max() > 1.0  # not a degenerate model
    worst = {f"{i}..{i + CHUNK}": round(float(diff[i:i + CHUNK].max()), 5) for i in range(0, TOKENS, CHUNK)}
    assert diff.max() <= TOL, f"largest |logit difference| per block of positions: {worst}"


@pytest.mark.slow
def test_greedy_tokens_through_the_engine_after_a_16k_prompt_match_transformers(run):
    engine = kimi_jax.BatchEngine(run["model"], max_batch=1, max_len=TOKENS + NEW + 1, chunk=CHUNK)
    (request,) = engine.generate([run["prompt"]], kimi_jax.SamplingParams(max_new_tokens=NEW))
    # Each of the reference's choices leads by more than twice the logit tolerance, so no difference
    # the logits test admits could flip it.
    assert min(run["margins"]) > 2 * TOL
    assert request.tokens == run["ref_tokens"]


def test_a_long_sequence_attends_to_itself_block_by_block_as_in_one_block(monkeypatch):
    """Past SELF_ATTENTION_BLOCK keys a whole-sequence forward visits its keys block by block (so a
    16K forward holds [t, 2048] scores, not [t, t]); the logits are those of a single block, the
    last, partial block and the blocks before any query's first key included."""
    model = KimiK2(TINY, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 37)))
    one_block = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, tokens))
    monkeypatch.setattr(mla, "SELF_ATTENTION_BLOCK", 8)  # read when the forward is traced
    blocks = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, tokens))
    assert np.abs(blocks - one_block).max() <= 1e-5
