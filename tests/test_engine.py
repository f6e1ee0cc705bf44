"""BatchEngine on a tiny random model (float32): what continuous batching, decode blocks, row
packing and stopping on the device must not change, and what they must save. The numerics against
transformers are test_parity.py; the scheduling policy alone, on a mock device, test_scheduler.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged import Rows

from kimi_jax import moe, steps
from kimi_jax.config import TINY
from kimi_jax.engine import BatchEngine
from kimi_jax.errors import KimiError
from kimi_jax.fixtures import with_fixture_token_ids
from kimi_jax.model import KimiK2
from kimi_jax.sampling import SamplingParams

CFG = with_fixture_token_ids(TINY)
TOL = 1e-4
GREEDY = SamplingParams(max_new_tokens=24)
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def model():
    return KimiK2(CFG, dtype=jnp.float32)


@pytest.fixture(scope="module")
def engines(model):
    """One step per dispatch, and blocks of up to 16: everything else the same."""
    kw = dict(max_batch=4, max_len=96, chunk=8, page_size=4)
    return BatchEngine(model, decode_block=1, **kw), BatchEngine(model, decode_block=16, **kw)


def _prompts(seed, *lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size - 256, n).tolist() for n in lengths]


def test_each_prompt_of_a_batch_equals_the_prompt_alone(model, engines):
    _, engine = engines
    prompts = _prompts(0, 3, 11, 17)
    batch_logits = Rows(model, 3, 96).prefill(prompts, chunk=8)
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=10))
    for row, prompt in enumerate(prompts):
        alone_logits = Rows(model, 1, 96).prefill([prompt], chunk=8)
        assert np.abs(batch_logits[row] - alone_logits[0]).max() <= TOL
        (alone,) = engine.generate([prompt], SamplingParams(max_new_tokens=10))
        assert batch[row].tokens == alone.tokens


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_decode_blocks_give_the_tokens_of_single_steps(engines, sampling):
    single, blocks = engines
    prompts = _prompts(1, 5, 9, 2, 14, 7, 3)  # more prompts than slots: requests join running blocks
    want = [r.tokens for r in single.generate(prompts, sampling)]
    assert [r.tokens for r in blocks.generate(prompts, sampling)] == want
    assert len({tuple(t) for t in want}) == len(prompts)  # the prompts do lead to different tokens


def test_rows_stop_inside_a_block_at_their_stop_id_budget_and_context_end(engines):
    single, blocks = engines
    prompts = _prompts(2, 6, 6, 88)
    free = single.generate(prompts, SamplingParams(max_new_tokens=20))
    stop_at = free[0].tokens[6]
    params = [SamplingParams(max_new_tokens=20, stop_ids=(stop_at,)), SamplingParams(max_new_tokens=5),
              SamplingParams(max_new_tokens=20)]
    done = [blocks.submit(p, s) for p, s in zip(prompts, params)]
    blocks.wait(done)
    first = free[0].tokens.index(stop_at)
    assert done[0].tokens == free[0].tokens[:first + 1] and done[0].finish_reason == "stop"
    assert done[1].tokens == free[1].tokens[:5] and done[1].finish_reason == "length"
    assert done[2].tokens == free[2].tokens[:8] and done[2].finish_reason == "length"  # 88 + 8 = 96
    assert blocks.pool.used() == 0  # every page is back: unowned and cached, or free


def test_prompts_of_any_length_reuse_the_same_compiled_programs(model):
    # Shapes no other test uses, so this test sees their first compiles whatever ran before.
    rounds = [(1, 5), (9, 30), (17, 2), (40, 40)]
    rng = np.random.default_rng(0)

    def run(engine):
        for lengths in rounds:
            prompts = [rng.integers(0, 200, n).tolist() for n in lengths]
            engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9))

    before = steps.compile_counts()
    first = BatchEngine(model, max_batch=2, max_len=72, chunk=8, page_size=4, decode_block=4)
    run(first)
    after_first = steps.compile_counts()
    added = {k: after_first[k] - before[k] for k in before}
    # One prefill; one decode program per row bucket (the block length is data): 1 and 2 rows.
    assert added == {"prefill": 1, "decode": len(first.scheduler.buckets), "verify": 0}
    assert first.scheduler.buckets == [1, 2]
    # A second engine of the same shapes, and new prompt lengths, run the same programs.
    run(BatchEngine(model, max_batch=2, max_len=72, chunk=8, page_size=4, decode_block=4))
    assert steps.compile_counts() == after_first


def test_bad_prompts_raise_readable_errors(engines):
    engine, _ = engines
    with pytest.raises(KimiError, match="empty prompt"):
        engine.submit([], SamplingParams())
    with pytest.raises(KimiError, match="does not fit the context of 96 tokens"):
        engine.submit([1] * 96, SamplingParams())
    with pytest.raises(KimiError, match="outside the vocabulary"):
        engine.submit([CFG.vocab_size], SamplingParams())
    tiny = KimiK2(CFG.replace(num_hidden_layers=1), dtype=jnp.float32)
    with pytest.raises(KimiError, match="decode_block .steps per dispatch. must be >= 1"):
        BatchEngine(tiny, max_len=16, decode_block=0)
    with pytest.raises(KimiError, match="cannot hold one request of max_len 64 tokens"):
        BatchEngine(tiny, max_len=64, page_size=4, n_pages=8)


def test_more_prompts_than_slots_and_queue_all_finish_in_order(model, engines):
    engine, _ = engines
    small = BatchEngine(model, max_batch=2, max_len=32, chunk=8, page_size=4, max_queue=1)
    prompts = _prompts(3, 3, 5, 4, 6, 2)
    done = small.generate(prompts, SamplingParams(max_new_tokens=3))
    assert [r.prompt_ids for r in done] == prompts and all(len(r.tokens) == 3 for r in done)
    assert [r.tokens for r in done] == [r.tokens for r in engine.generate(prompts, SamplingParams(max_new_tokens=3))]


def test_idle_rows_and_prefill_padding_take_no_expert(model, monkeypatch):
    # Count the rows each MoE layer hands its experts, from inside the compiled programs.
    sizes = []
    original = moe.expert_ffn

    def counting(xs, gate, up, down, group_sizes, impl):
        jax.debug.callback(lambda gs: sizes.append(int(np.sum(gs))), group_sizes)
        return original(xs, gate, up, down, group_sizes, impl)

    monkeypatch.setattr(moe, "expert_ffn", counting)
    # A 32-slot engine (shapes no other test compiles, so these programs carry the counter) with
    # two requests: one stops after 2 tokens, inside the first block of the other's 12.
    engine = BatchEngine(model, max_batch=32, max_len=40, chunk=8, page_size=4, prefill_rows=2, decode_block=4)
    both = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in (([1, 2, 3, 4, 5], 2), ([4, 3, 2, 1, 0], 12))]
    engine.wait(both)
    assert [len(r.tokens) for r in both] == [2, 12]
    # Tokens through the experts: 5 per prompt in an 8-token chunk, then one per step a request
    # still generates (1 and 11 steps), each with num_experts_per_tok experts, in every MoE layer.
    assert sum(sizes) == CFG.num_experts_per_tok * CFG.n_moe_layers * (5 + 5 + 1 + 11)


def test_a_constraint_masks_tokens_and_the_row_runs_free_until_its_boundary(model, engines):
    _, engine = engines
    (prompt,) = _prompts(4, 7)
    (free,) = engine.generate([prompt], SamplingParams(max_new_tokens=16))
    boundary, forced = free.tokens[3], (free.tokens[0] + 1) % CFG.vocab_size

    class OnlyAfter:
        """Free until `boundary`, then only `forced` (a grammar that has one continuation)."""
        breaks = frozenset({boundary})

        def __init__(self):
            self.seen = []

        def mask(self):
            if boundary not in self.seen:
                return None
            words = np.zeros(-(-CFG.vocab_size // 32), np.int32)
            words[forced // 32] = np.array(1 << (forced % 32), np.uint32).view(np.int32)
            return words

        def accept(self, token):
            self.seen.append(token)

    constraint = OnlyAfter()
    other = engine.submit(_prompts(5, 9)[0], SamplingParams(max_new_tokens=16))  # an unconstrained neighbour
    req = engine.submit(prompt, SamplingParams(max_new_tokens=16), constraint=constraint)
    engine.wait([req, other])
    cut = free.tokens.index(boundary) + 1
    assert req.tokens == free.tokens[:cut] + [forced] * (16 - cut)
    assert constraint.seen == req.tokens
    (alone,) = engine.generate([other.prompt_ids], SamplingParams(max_new_tokens=16))
    assert other.tokens == alone.tokens


def test_warm_up_compiles_every_program_and_changes_no_slot(model, engines):
    _, blocks = engines
    engine = BatchEngine(model, max_batch=4, max_len=56, chunk=8, page_size=4, decode_block=16)  # shapes of its own
    before = steps.compile_counts()
    engine.warm_up(masks=True)
    warm = steps.compile_counts()
    # The prefill chunk, and a decode block per row bucket (1, 2, 4 rows) with and without a mask.
    assert {k: warm[k] - before[k] for k in warm} == {"prefill": 1, "decode": 2 * 3, "verify": 0}
    prompts = _prompts(6, 3, 9, 4, 7, 5)
    done = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    assert steps.compile_counts() == warm
    assert [r.tokens for r in done] == [r.tokens for r in blocks.generate(prompts, SamplingParams(max_new_tokens=8))]
