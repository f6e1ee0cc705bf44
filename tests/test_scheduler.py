"""The scheduling policy on a mock device (tests/mock_device.py): token ids in, token ids out, no
JAX. Admission, prefix pages, chunks, packing, block lengths, stopping, cancellation and
constrained rows, checked against what each request must generate."""

import random
import subprocess
import sys

import numpy as np
import pytest
from mock_device import VOCAB, MockDevice, bits, expected

from kimi_jax.pages import PagePool
from kimi_jax.sampling import SamplingParams
from kimi_jax.scheduler import Request, Scheduler, row_buckets


def make(*, max_batch=4, max_len=64, chunk=8, page_size=4, n_pages=None, decode_block=16, shards=1,
         prefill_rows=1):
    n_pages = n_pages or shards * (1 + 2 * max_batch * (-(-max_len // page_size)) // shards)
    device = MockDevice(max_batch, n_pages, page_size)
    pool = PagePool(n_pages, page_size, shards=shards)
    return Scheduler(device, max_batch=max_batch, max_len=max_len, chunk=chunk, pool=pool,
                     prefill_rows=prefill_rows, decode_block=decode_block), device


def run(sched, requests):
    sched.waiting.extend(requests)
    while sched.step():
        pass
    return requests


def req(prompt, n=12, **kw):
    return Request(list(prompt), SamplingParams(max_new_tokens=n, **kw))


def prompts(seed, count, lo=1, hi=30):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_the_scheduler_runs_without_jax():
    code = "import sys, kimi_jax.scheduler, kimi_jax.pages, kimi_jax.sampling; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("decode_block", [1, 16])
@pytest.mark.parametrize("prefill_rows", [1, 3])
def test_every_request_gets_exactly_its_tokens(decode_block, prefill_rows):
    sched, _ = make(decode_block=decode_block, prefill_rows=prefill_rows)
    todo = [req(p, n) for p, n in zip(prompts(0, 11), [1, 5, 12, 30, 2, 7, 16, 17, 3, 25, 9])]
    run(sched, todo)
    for r in todo:
        assert r.tokens == expected(r.prompt_ids, r.sampling.max_new_tokens) and r.finish_reason == "length"
    assert sched.pool.used() == 0 and not sched.busy()


def test_stop_ids_context_end_and_budgets_cut_inside_a_block():
    sched, device = make(max_len=40)
    p = prompts(1, 3, 5, 5)
    free = expected(p[0], 20)
    stop = free[9]
    todo = [req(p[0], 20, stop_ids=(stop,)), req(p[1], 3), req([7] * 35, 20)]
    run(sched, todo)
    assert todo[0].tokens == free[:free.index(stop) + 1] and todo[0].finish_reason == "stop"
    assert todo[1].tokens == expected(p[1], 3) and todo[1].finish_reason == "length"
    assert todo[2].tokens == expected([7] * 35, 5) and todo[2].finish_reason == "length"  # 35 + 5 = 40
    # Single steps while the prompts are prefilled (the last takes 5 chunks), then one block sized
    # to what is left (20 - 1 - 6 tokens); the first request stopped inside it.
    assert [w.steps for w in device.decodes()] == [1] * 6 + [13]


def test_blocks_are_short_while_prompts_wait_and_long_when_all_decode():
    sched, device = make(max_batch=2, chunk=4, prefill_rows=1)
    a, b = req([1, 2, 3], 40), req(list(range(20)), 40)
    run(sched, [a, b])
    decodes = device.decodes()
    # While b's five chunks are prefilled, a decodes one step per dispatch; then blocks of 16.
    assert [w.steps for w in decodes[:6]] == [1, 1, 1, 1, 1, 16]
    assert a.tokens == expected(a.prompt_ids, 40) and b.tokens == expected(b.prompt_ids, 40)


def test_active_slots_are_packed_into_the_smallest_bucket():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 32] and row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(8, shards=2) == [2, 4, 8]
    sched, device = make(max_batch=32)
    (r,) = run(sched, [req([3, 1, 4, 1, 5], 20)])
    assert {len(w.rows) for w in device.decodes()} == {1}
    assert r.tokens == expected(r.prompt_ids, 20)


def test_data_shards_keep_each_slot_in_its_own_part_of_the_rows():
    sched, device = make(max_batch=8, shards=2)
    todo = [req(p, 10) for p in prompts(2, 3)]  # slots 0, 1, 2: all on shard 0
    run(sched, todo)
    for w in device.decodes():
        per = len(w.rows) // 2
        assert all(s < 4 for s in w.rows[:per] if s < 8) and all(s >= 4 for s in w.rows[per:] if s < 8)
    assert all(r.tokens == expected(r.prompt_ids, 10) for r in todo)


def test_prefix_pages_are_shared_and_give_the_same_tokens():
    sched, device = make(max_batch=2, page_size=4)
    system = prompts(3, 1, 24, 24)[0]
    first = run(sched, [req(system + [1, 2, 3], 8)])[0]
    later = run(sched, [req(system + [9, 9], 8), req(system + first.tokens[:3], 8)])
    assert [r.cached_tokens for r in later] == [24, 24]
    for r in [first, *later]:
        assert r.tokens == expected(r.prompt_ids, 8)


def test_a_small_pool_makes_requests_wait_and_evicts_cached_prefixes():
    # Room for about two requests at a time: the others wait for pages, and old prefixes go.
    sched, _ = make(max_batch=4, max_len=32, n_pages=17)
    todo = [req(p, 10) for p in prompts(4, 9, 10, 20)]
    run(sched, todo)
    assert all(r.tokens == expected(r.prompt_ids, 10) for r in todo)
    assert sched.pool.used() == 0


def test_cancelling_mid_block_frees_the_slot_and_ignores_tokens_in_flight():
    sched, _ = make(max_batch=1, max_len=256)
    a, b = req([5, 5, 5], 200), req([6, 6], 6)
    sched.waiting.extend([a, b])
    for _ in range(4):
        sched.step()
    a.cancel()
    while sched.step():
        pass
    assert a.finish_reason == "cancelled" and 0 < len(a.tokens) < 200
    assert a.tokens == expected(a.prompt_ids, 200)[:len(a.tokens)]
    assert b.tokens == expected(b.prompt_ids, 6) and sched.pool.used() == 0


class Grammar:
    """A constraint that is free until `boundary`, then allows only `allowed` (ids) for `n` tokens,
    then only `end`."""

    def __init__(self, boundary, allowed, n, end):
        self.breaks = frozenset({boundary})
        self.boundary, self.allowed, self.n, self.end = boundary, allowed, n, end
        self.seen = []

    def mask(self):
        if self.boundary not in self.seen:
            return None
        after = len(self.seen) - self.seen.index(self.boundary) - 1
        ids = self.allowed if after < self.n else [self.end]
        words = np.zeros(-(-VOCAB // 32), np.uint32)
        for i in ids:
            words[i // 32] |= np.uint32(1 << (i % 32))
        return words.view(np.int32)

    def accept(self, token):
        self.seen.append(token)


def test_a_constrained_row_runs_free_blocks_then_masked_single_steps():
    sched, device = make(max_batch=2)
    prompt = [4, 8, 15]
    free = expected(prompt, 30)
    boundary = free[5]
    grammar = Grammar(boundary, allowed=[10, 20, 30], n=6, end=99)
    r = Request(prompt, SamplingParams(max_new_tokens=30, stop_ids=(99,)), constraint=grammar)
    neighbour = req([1, 1, 2, 3], 30)
    run(sched, [r, neighbour])
    cut = free.index(boundary) + 1
    assert r.tokens[:cut] == free[:cut]
    assert all(t in (10, 20, 30) for t in r.tokens[cut:cut + 6]) and r.tokens[cut + 6:] == [99]
    assert r.finish_reason == "stop" and grammar.seen == r.tokens
    assert neighbour.tokens == expected(neighbour.prompt_ids, 30)
    masked = [w for w in device.decodes() if w.mask is not None]
    assert len(masked) == 7 and all(w.steps == 1 for w in masked)
    assert any(kind == "resume" for kind, _ in device.log)
    # Only the constrained request's row (slot 0: admitted first) is masked.
    for w in masked:
        for b, s in enumerate(w.rows):
            assert bits(w.mask[b]).all() == (s != 0)


def test_a_mask_from_the_start_applies_to_the_first_token_of_prefill():
    sched, _ = make()
    grammar = Grammar(boundary=-5, allowed=[42], n=3, end=7)
    grammar.seen = [-5]  # already past its boundary: constrained from the first token
    r = Request([1, 2, 3], SamplingParams(max_new_tokens=10, stop_ids=(7,)), constraint=grammar)
    run(sched, [r])
    assert r.tokens == [42, 42, 42, 7]


def test_warm_up_runs_every_program_on_nothing():
    sched, device = make(max_batch=8)
    sched.warm_up(masks=True)
    kinds = [(kind, len(w.rows) if kind == "decode" else None, w.mask is not None if kind == "decode" else None)
             for kind, w in device.log]
    assert kinds == [("prefill", None, None)] + [("decode", b, m) for b in (1, 2, 4, 8) for m in (False, True)]
    assert all(w.steps == 0 for w in device.decodes()) and not device.alive.any() and not device.lengths.any()
    (r,) = run(sched, [req([2, 7, 1, 8], 9)])
    assert r.tokens == expected(r.prompt_ids, 9)
