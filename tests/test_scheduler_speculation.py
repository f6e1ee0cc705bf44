"""Speculation in the scheduling policy, on the mock device (tests/mock_device.py), whose 'model'
copies what followed an earlier occurrence of its last tokens: drafts get accepted, and a request
must still get exactly the tokens plain decoding gives it, whatever was drafted and verified."""

import numpy as np
import pytest
from mock_device import MockDevice, expected
from test_scheduler import Grammar, prompts, req, run

from kimi_jax.pages import PagePool
from kimi_jax.sampling import SamplingParams
from kimi_jax.scheduler import Request, Scheduler
from kimi_jax.speculation import FixedCosts, Speculator


def make(mode="suffix", *, max_batch=4, max_len=64, page_size=4, decode_block=16, ratio=1.0, max_draft=4,
         speculator=None):
    n_pages = 1 + 2 * max_batch * (-(-max_len // page_size))
    device = MockDevice(max_batch, n_pages, page_size)
    spec = speculator or Speculator(mode, max_draft, costs=FixedCosts(ratio))
    sched = Scheduler(device, max_batch=max_batch, max_len=max_len, chunk=8, pool=PagePool(n_pages, page_size),
                      decode_block=decode_block, speculator=spec)
    return sched, device


def repeating(seed, count):
    """Prompts that repeat a random phrase (the mock model goes on repeating it) and plain ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        phrase = rng.integers(0, 100, int(rng.integers(4, 9))).tolist()
        out.append(phrase * 2 + phrase[:3] if i % 3 else rng.integers(0, 100, 12).tolist())
    return out


@pytest.mark.parametrize("mode", ["ngram", "suffix"])
@pytest.mark.parametrize("decode_block", [1, 16])
def test_every_request_gets_exactly_its_tokens_with_drafts_verified(mode, decode_block):
    sched, device = make(mode, decode_block=decode_block)
    todo = [req(p, n) for p, n in zip(repeating(0, 9), [30, 5, 17, 1, 40, 9, 25, 2, 33])]
    run(sched, todo)
    for r in todo:
        assert r.tokens == expected(r.prompt_ids, r.sampling.max_new_tokens) and r.finish_reason == "length"
    stats = sched.spec.stats
    assert device.verifies() and stats["accepted_tokens"] > 40
    assert stats["verify_tokens"] > 2 * stats["verify_rows"]  # several tokens per row and step
    assert sched.pool.used() == 0 and not sched.busy()


def test_stop_ids_budgets_and_the_context_end_cut_a_verify_step():
    sched, device = make(max_len=40)
    phrase = [11, 12, 13, 14, 15, 16]
    free = expected(phrase * 2, 20)
    todo = [req(phrase * 2, 20, stop_ids=(free[8],)), req(phrase * 2 + [11], 7), req(phrase * 6, 20)]
    run(sched, todo)
    assert todo[0].tokens == free[:free.index(free[8]) + 1] and todo[0].finish_reason == "stop"
    assert todo[1].tokens == expected(todo[1].prompt_ids, 7) and todo[1].finish_reason == "length"
    assert todo[2].tokens == expected(phrase * 6, 4) and todo[2].finish_reason == "length"  # 36 + 4 = 40
    # The runs were long enough to be cut inside a step: the stop came from an accepted draft.
    assert any(w.n_draft.max() >= 2 for w in device.verifies())
    assert sched.pool.used() == 0


class WrongDrafts(Speculator):
    """Drafts the true continuation with one wrong token in it (a rejection every step, sometimes
    on the first token), so every verify step leaves rejected drafts in the cache."""

    def __init__(self):
        super().__init__("ngram", 4, costs=FixedCosts(1.0))
        self.calls = 0

    def drafts(self, rows, remaining, width):
        out = {}
        for r in rows:
            if not r._inflight and remaining(r) > 1:
                self.calls += 1
                truth = expected(r.prompt_ids + r.tokens, min(4, remaining(r) - 1))
                truth[self.calls % len(truth)] = (truth[self.calls % len(truth)] + 1) % 100
                out[r] = truth
        return out

    def plan(self, rows, bucket, steps):
        return 4


def test_rejected_drafts_leave_nothing_behind():
    sched, device = make(speculator=WrongDrafts())
    todo = [req(p, 21) for p in prompts(5, 6, 3, 20)]
    run(sched, todo)
    assert all(r.tokens == expected(r.prompt_ids, 21) for r in todo)
    stats = sched.spec.stats
    assert 0 < stats["accepted_tokens"] < stats["drafted_tokens"]
    assert sched.pool.used() == 0


def test_streams_get_the_tokens_of_a_verify_step_at_once():
    events = []
    sched, _ = make()
    r = Request([3, 1, 4, 1, 5, 9] * 2, SamplingParams(max_new_tokens=30), on_event=lambda r, t, done: events.append(t))
    run(sched, [r])
    assert [t for e in events for t in e] == r.tokens == expected(r.prompt_ids, 30)
    assert max(len(e) for e in events) > 1


def test_suffix_mode_drafts_from_the_outputs_of_earlier_requests():
    prompt = prompts(6, 1, 20, 20)[0]  # no repeats: nothing of its own to draft from
    accepted = {}
    for mode in ("ngram", "suffix"):
        sched, _ = make(mode, max_batch=1, max_len=96, decode_block=1)
        first, again = run(sched, [req(prompt, 40)]), run(sched, [req(prompt, 40)])
        assert first[0].tokens == again[0].tokens == expected(prompt, 40)
        accepted[mode] = sched.spec.stats["accepted_tokens"]
    assert accepted["suffix"] >= accepted["ngram"] + 20


def test_no_verify_step_when_it_costs_more_than_it_makes():
    sched, device = make(ratio=50.0)
    todo = [req(p, 20) for p in repeating(1, 4)]
    run(sched, todo)
    assert not device.verifies() and all(r.tokens == expected(r.prompt_ids, 20) for r in todo)


def test_a_constrained_row_drafts_only_while_its_constraint_is_free():
    sched, device = make(max_batch=2)
    prompt = [4, 8, 15, 16, 23, 42] * 2
    free = expected(prompt, 30)
    boundary = free[5]
    grammar = Grammar(boundary, allowed=[10, 20, 30], n=6, end=99)
    r = Request(prompt, SamplingParams(max_new_tokens=30, stop_ids=(99,)), constraint=grammar)
    neighbour = req([1, 1, 2, 3] * 3, 30)
    run(sched, [r, neighbour])
    cut = free.index(boundary) + 1
    assert r.tokens[:cut] == free[:cut] and grammar.seen == r.tokens
    assert all(t in (10, 20, 30) for t in r.tokens[cut:cut + 6]) and r.tokens[cut + 6:] == [99]
    assert neighbour.tokens == expected(neighbour.prompt_ids, 30)
    assert any(r in w.drafted for w in device.verifies())  # it drafted in its free phase
    # Its constrained tokens came from masked decode steps (a verify step takes no mask), and its
    # drafting neighbour rode along in them instead of verifying.
    masked_steps = [w for kind, w in device.log if kind == "decode" and w.mask is not None]
    assert len(masked_steps) >= 6
    assert any(neighbour in [q for _, q in w.requests] for w in masked_steps)


def test_warm_up_also_runs_a_verify_step_per_bucket_and_draft_width():
    sched, device = make(max_batch=4, max_draft=8)
    sched.warm_up(masks=True)
    verifies = [(len(w.rows), w.drafts.shape[1]) for w in device.verifies()]
    assert sorted(verifies) == sorted((b, k) for b in (1, 2, 4) for k in (2, 4, 8))  # none masked
    assert not any(w.n_draft.any() for w in device.verifies())
    assert not device.alive.any() and not device.lengths.any() and sched.spec.stats["verify_steps"] == 0
    todo = run(sched, [req(p, 20) for p in repeating(2, 3)])
    assert all(r.tokens == expected(r.prompt_ids, 20) for r in todo) and device.verifies()[-1].n_draft.any()
