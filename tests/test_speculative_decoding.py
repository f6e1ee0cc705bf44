"""Speculative decoding through the compiled verify step (steps.verify_step) in the engine: a
request's tokens are those of plain decoding whatever was drafted, greedy or sampled, on float32,
bf16 and INT4 models, under continuous batching, with stops, budgets and the context end cutting
accepted runs; and the tokens of a sampled row follow the model's distribution. The policy alone,
on a mock device, is test_scheduler_speculation.py; the drafting, test_drafting.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.cache import PagedCache
from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.draw import _filtered_logits
from kimi_jax.engine import BatchEngine
from kimi_jax.fixtures import with_fixture_token_ids
from kimi_jax.model import KimiK2
from kimi_jax.sampling import SamplingParams, knob_arrays
from kimi_jax.speculation import FixedCosts, Speculator
from kimi_jax.steps import SlotState, prefill_step, split_model, verify_step

CFG = with_fixture_token_ids(TINY)
# Few shapes, few compiles: 2 slots (buckets 1 and 2), one-step decode blocks, drafts of up to 2 (one width).
KW = dict(max_batch=2, max_len=96, chunk=8, page_size=4, decode_block=1)
GREEDY = SamplingParams(max_new_tokens=24)
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def model():
    return KimiK2(CFG, dtype=jnp.float32)


class Oracle(Speculator):
    """Drafts from the tokens plain decoding made (`truth`, per prompt), with every fifth draft
    token wrong: most drafts are accepted, some only in part, some not at all."""

    def __init__(self, truth: dict):
        super().__init__("ngram", 2, costs=FixedCosts(1.0))
        self.truth, self.made = truth, 0

    def plan(self, rows, bucket, steps):
        return 2

    def drafts(self, rows, remaining, width):
        out = {}
        for r in rows:
            if r._inflight or remaining(r) < 2:
                continue
            draft = list(self.truth[tuple(r.prompt_ids)][len(r.tokens):len(r.tokens) + min(width, remaining(r) - 1)])
            for i in range(len(draft)):
                self.made += 1
                if self.made % 5 == 0:
                    draft[i] = (draft[i] + 1) % CFG.vocab_size
            if draft:
                out[r] = draft
        return out


def _prompts(seed, *lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size - 256, n).tolist() for n in lengths]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_verified_drafts_give_the_tokens_of_plain_decoding(model, sampling):
    prompts = _prompts(1, 5, 9, 2, 14, 7, 3, 88)  # more prompts than slots: requests join running steps
    plain = BatchEngine(model, **KW)
    truth = [r.tokens for r in plain.generate(prompts, sampling)]
    stop_at = truth[1][9]  # inside a run of accepted drafts
    params = [sampling] * 7
    params[1] = SamplingParams(**{**vars(sampling), "stop_ids": (stop_at,)})
    params[2] = SamplingParams(**{**vars(sampling), "max_new_tokens": 6})
    spec = BatchEngine(model, **KW)
    spec.scheduler.spec = oracle = Oracle({tuple(p): t for p, t in zip(prompts, truth)})
    done = [spec.submit(p, s) for p, s in zip(prompts, params)]
    spec.wait(done)
    for i in (0, 3, 4, 5):
        assert done[i].tokens == truth[i] and done[i].finish_reason == "length"
    assert done[1].tokens == truth[1][:truth[1].index(stop_at) + 1] and done[1].finish_reason == "stop"
    assert done[2].tokens == truth[2][:6]
    assert done[6].tokens == truth[6][:8] and done[6].finish_reason == "length"  # 88 + 8 = the context
    stats = oracle.stats
    assert 0 < stats["accepted_tokens"] < stats["drafted_tokens"]
    assert stats["verify_tokens"] > 1.8 * stats["verify_rows"]  # several tokens per row and step
    assert spec.pool.used() == 0  # rejected drafts' pages all came back


def _checkpoint_model(fixture_dir, name, cfg):
    path = fixture_dir(name, cfg, tokenizer=False)
    return load_model(path, dtype=jnp.bfloat16, progress=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, Int4Quant(group_size=16)], ids=["bf16", "int4"])
def test_drafting_from_the_text_changes_no_token_of_a_checkpoint(fixture_dir, quant):
    # Real drafts (each request's own tokens and the other requests' outputs) on checkpoints loaded
    # in bf16, with INT4 routed experts or without; prompts that repeat themselves, so some drafts
    # are right and some wrong, in batches that change as requests come and go.
    cfg = with_fixture_token_ids(TINY.replace(quantization=quant))
    model = _checkpoint_model(fixture_dir, "spec_int4" if quant else "spec_bf16", cfg)
    rng = np.random.default_rng(7)
    phrases = [rng.integers(0, 256, int(n)).tolist() for n in (3, 5, 2, 6, 4)]
    prompts = [p * 4 + p[:1] for p in phrases]
    kw = dict(max_batch=2, max_len=64, chunk=8, page_size=4, decode_block=1)
    plain = BatchEngine(model, **kw).generate(prompts, SamplingParams(max_new_tokens=30))
    engine = BatchEngine(model, speculate="suffix", draft_tokens=2, **kw)
    engine.scheduler.spec.costs = FixedCosts(1.0)  # verify whenever a draft exists
    spec = engine.generate(prompts, SamplingParams(max_new_tokens=30))
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    metrics = engine.metrics()
    assert metrics["verify_steps"] > 0 and metrics["draft_tokens_accepted"] > 0
    assert engine.pool.used() == 0


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value a fit exceeds with probability ~0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _fits(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Chi-square goodness of fit of observed `counts` to `probs`, rare categories pooled."""
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])
    return stat < _chi2_critical(int(keep.sum()) - 1)


def test_speculative_sampling_keeps_the_model_distribution():
    # A 16-token vocabulary, 1024 seeded rows that all feed the same context and the draft (x, y).
    # The first token must follow p(. | ctx) whatever x is (x survives with probability p(x)); a
    # second token exists exactly when the first is x, and follows p(. | ctx, x). (That each row's
    # tokens are those plain sampling draws with its seed is test_verified_drafts_give_...)
    cfg = TINY.replace(vocab_size=16)
    model = KimiK2(cfg, dtype=jnp.float32)
    model_def, weights = split_model(model)
    rows, prompt = 64, [3, 1, 4, 1, 5, 9, 2]
    cache = PagedCache.create(cfg, slots=rows, max_len=16, page_size=4, n_pages=1 + 4 * rows, dtype=jnp.float32)
    cache = cache.with_table(1 + np.arange(4 * rows, dtype=np.int32).reshape(rows, 4))
    knob = dict(temperature=0.8, top_k=12)

    @jax.jit
    def dists(context):
        """The sampling distributions after each token of `context` [1, n] (one forward pass)."""
        logits = model.forward_no_cache(context)[0]
        n = logits.shape[0]
        filtered = _filtered_logits(logits, jnp.full(n, knob["temperature"]), jnp.full(n, knob["top_k"]),
                                    jnp.ones(n))
        return jax.nn.softmax(filtered, axis=-1)

    p1 = np.asarray(dists(jnp.asarray([prompt + [0]])), np.float64)[-2]
    x = int(np.argsort(p1)[-2])  # a likely token, not the likeliest
    p2 = np.asarray(dists(jnp.asarray([prompt + [x]])), np.float64)[-1]
    y = int(np.argmax(p2))
    firsts, seconds = [], []
    slots = np.arange(rows, dtype=np.int32)
    tokens = np.tile(np.asarray(prompt[:-1] + [0], np.int32), (rows, 1))
    for round_ in range(16):
        knobs = knob_arrays([SamplingParams(**knob, seed=1000 * round_ + i) for i in range(rows)])
        state = SlotState.create(rows, cache.lengths.sharding)
        _, _, cache, state = prefill_step(model_def, weights, cache, state, tokens, slots, np.zeros(rows, np.int32),
                                          np.full(rows, len(prompt) - 1, np.int32), np.full(rows, -1, np.int32),
                                          knobs, impl="xla")
        state = SlotState(tokens=jnp.full(rows, prompt[-1], jnp.int32), alive=jnp.ones(rows, bool),
                          budget=jnp.full(rows, 4, jnp.int32))
        out, cache, _ = verify_step(model_def, weights, cache, state, slots,
                                    np.tile(np.asarray([x, y], np.int32), (rows, 1)), np.full(rows, 2, np.int32),
                                    knobs, impl="xla")
        for column in np.asarray(out).T:
            made = [int(t) for t in column if t >= 0]
            assert len(made) == 1 + (made[0] == x) + (made[:2] == [x, y])
            firsts.append(made[0])
            if made[0] == x:
                seconds.append(made[1])
    firsts, seconds = np.asarray(firsts), np.asarray(seconds)
    assert 0.1 < p1[x] < 0.9 and len(seconds) > 100
    assert abs(len(seconds) / len(firsts) - p1[x]) < 4 * np.sqrt(p1[x] * (1 - p1[x]) / len(firsts))
    assert _fits(np.bincount(firsts, minlength=16), p1)
    assert _fits(np.bincount(seconds, minlength=16), p2)
    # The check has teeth: the first tokens do not fit the distribution that follows x.
    assert not _fits(np.bincount(firsts, minlength=16), p2)
