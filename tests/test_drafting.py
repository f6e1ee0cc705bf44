"""Drafting without a draft model (kimi_jax/drafting.py) and the choice between verifying and
decoding (kimi_jax/speculation.py), as plain Python over token ids."""

import math
import subprocess
import sys

import pytest

from kimi_jax.drafting import MAX_MATCH, RequestDrafter, SuffixIndex
from kimi_jax.errors import KimiError
from kimi_jax.speculation import STALE_AFTER, FixedCosts, Speculator, StepCosts, draft_widths


def test_drafting_and_speculation_run_without_jax():
    code = "import sys, kimi_jax.drafting, kimi_jax.speculation; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_longest_earlier_match_proposes_what_followed_it():
    index = SuffixIndex()
    index.add([1, 2, 3, 4, 5, 6, 7, 9, 9, 3, 4, 5, 8, 1, 2])
    # "3 4 5" occurs twice; preceded by "2" only the first time, as in the query.
    assert index.match([0, 2, 3, 4, 5]) == (4, 5)
    assert index.continuation(5, 3) == [6, 7, 9]
    # Without the "2", both are 3-token matches: the more recent wins.
    length, end = index.match([7, 3, 4, 5])
    assert (length, index.continuation(end, 2)) == (3, [8, 1])
    assert index.match([5, 0]) == (0, -1)


def test_an_own_match_ends_before_the_sequence_end_and_periodic_text_continues_its_period():
    drafter = RequestDrafter.for_prompt([5, 1, 2, 3, 1, 2, 3, 1, 2], max_draft=8)
    drafter.length = 8
    # "1 2 3 1 2" occurred before, ending at the second 2: its continuation runs into the present
    # and goes on with the period; the draft is as long as that match.
    assert drafter.draft(None, 7) == [3, 1, 2, 3, 1] and drafter.match_len == 5
    run = RequestDrafter.for_prompt([4] * 6, max_draft=8)
    run.length = 8
    assert run.draft(None, 8) == [4] * 5


def test_a_long_anchor_finds_an_old_long_match_that_recent_coincidences_hide():
    line = list(range(100, 112))
    noise = [7, 8] * 20  # the last two query tokens, repeated more recently than the real match
    index = SuffixIndex()
    index.add(line + [50, 51] + noise)
    length, end = index.match(line[:10])
    assert length == 10 and index.continuation(end, 2) == [110, 111]
    assert MAX_MATCH >= 10


def test_documents_do_not_run_into_each_other():
    index = SuffixIndex()
    index.add([1, 2, 3])
    index.add([4, 5, 6])
    length, end = index.match([9, 2, 3])
    assert length == 2 and index.continuation(end, 4) == []  # the first document ends there
    length, end = index.match([3, 4, 5])
    assert length == 2 and index.continuation(end, 4) == [6]  # "3" belongs to the other document


def test_the_shared_index_keeps_its_capacity_by_dropping_the_oldest_outputs():
    index = SuffixIndex(capacity=100)
    for i in range(30):
        index.add([1000 + i, 1, 2, 3, 2000 + i])
    assert len(index) <= 100
    assert index.match([1000, 1])[0] == 0  # the oldest output is gone
    length, end = index.match([1029, 1, 2, 3])
    assert length == 4 and index.continuation(end, 1) == [2029]
    assert index.match([1015, 1])[0] == 2  # the newest stay
    for i in range(300):
        index.add([3000 + i, 7, 8])
    entries = sum(len(ends) for where in index._where.values() for ends in where.values())
    assert len(index) <= 100 and len(index.tokens) <= 2 * 100 + 10 and entries <= 3 * 100
    assert SuffixIndex(capacity=3).add([1, 2, 3, 4, 5]) is None  # a long output keeps its end only


def test_the_draft_grows_while_accepted_and_shrinks_to_what_was_accepted():
    drafter = RequestDrafter.for_prompt([*range(1, 30), *range(1, 11)], max_draft=8)
    assert drafter.draft(None, 8) == [11, 12]  # starts at 2 tokens
    drafter.observe(2, 2)
    assert drafter.draft(None, 8) == [11, 12, 13, 14]
    drafter.observe(4, 4)
    assert len(drafter.draft(None, 8)) == 8
    drafter.observe(8, 8)
    assert len(drafter.draft(None, 8)) == 8  # capped by max_draft
    drafter.observe(8, 3)
    assert drafter.draft(None, 8) == [11, 12, 13, 14]
    assert drafter.draft(None, 1) == [11]  # and by what the caller allows


def test_a_draft_is_no_longer_than_the_match_behind_it():
    drafter = RequestDrafter.for_prompt([8, 9, 1, 2, 3, 4, 5, 6, 7, 1, 2], max_draft=8)
    drafter.length = 8
    assert drafter.draft(None, 8) == [3, 4]


def test_drafts_that_keep_failing_pause_drafting_for_longer_each_time():
    drafter = RequestDrafter.for_prompt(list(range(50)) + [0, 1], max_draft=8)
    assert drafter.draft(None, 8) and drafter.expected_gain(8) > 0
    pauses = []
    for _ in range(3):
        while not drafter.paused():
            drafter.observe(2, 0)
        pauses.append(drafter.paused_until - len(drafter.own.tokens))
        assert drafter.expected_gain(8) == 0
        drafter.extend([0] * pauses[-1])
        assert not drafter.paused()
    assert pauses == [16, 32, 64]
    for _ in range(5):
        drafter.observe(4, 4)
    assert drafter.acceptance > 0.5 and drafter.backoff == 16


def test_the_expected_gain_follows_acceptance_and_match():
    drafter = RequestDrafter.for_prompt([1, 2, 3, 9, 1, 2], max_draft=8)
    drafter.draft(None, 8)
    a = drafter.acceptance
    assert drafter.expected_gain(8) == pytest.approx(a + a * a) and drafter.expected_gain(1) == pytest.approx(a)  # a draft of 2 tokens
    drafter.extend([77])
    drafter.draft(None, 8)
    assert drafter.match_len == 0 and drafter.expected_gain(8) == 0


def test_step_costs_drop_the_first_measurement_and_ask_for_stale_ones_again():
    costs = StepCosts()
    assert costs.ratio(4, 16, 8) == 0.0  # no verify step measured: try one
    costs.record("verify", 4, 8, 5.0)  # the compile
    assert costs.ratio(4, 16, 8) == 0.0
    costs.record("verify", 4, 8, 0.02)
    assert costs.ratio(4, 16, 8) == math.inf  # no decode block measured: run one
    costs.record("decode", 4, 16, 9.0)
    costs.record("decode", 4, 16, 0.16)
    assert costs.ratio(4, 16, 8) == pytest.approx(0.02 / 0.01)
    for _ in range(STALE_AFTER):
        costs.record("decode", 4, 16, 0.16)
    assert costs.ratio(4, 16, 8) == 0.0  # the verify cost is old: measure it again


def test_a_verify_cost_taken_again_after_going_stale_stays_fresh_longer_each_time():
    costs = StepCosts()
    for seconds in (5.0, 0.05):  # the compile, then a measurement
        costs.record("verify", 4, 8, seconds)
    costs.record("decode", 4, 16, 9.0)
    lives = []
    for _ in range(4):
        fresh = 0
        while costs.ratio(4, 16, 8) != 0.0:  # decode blocks run while the verify cost is fresh
            costs.record("decode", 4, 16, 0.16)
            fresh += 1
        lives.append(fresh)
        costs.record("verify", 4, 8, 0.05)  # stale: the policy tries it once more
    assert [round(n / STALE_AFTER, 1) for n in lives] == [1, 2, 4, 8]


class _Req:
    """What the speculator reads of a scheduler request."""

    def __init__(self, prompt):
        self.prompt_ids, self.tokens = prompt, []
        self._masked = self._halted = False
        self._inflight = 0
        self._drafter = None


def test_verify_only_when_the_expected_tokens_beat_its_cost():
    cheap, dear = Speculator("ngram", 8, costs=FixedCosts(1.0)), Speculator("ngram", 8, costs=FixedCosts(2.5))
    rows = [_Req([1, 2, 3, 4, 1, 2]), _Req([5, 6, 7, 8])]  # the first has a match, the second none
    for spec in (cheap, dear):
        for r in rows:
            spec.admit(r)
            spec.took(r, [3] if r is rows[0] else [9])
    for r in rows:
        r._drafter.accepted, r._drafter.trials, r._drafter.length = 9.0, 10.0, 8
        r._drafter.draft(None, 8)  # the lookup after a step, at that length
    gain = rows[0]._drafter.expected_gain(8)
    assert 1 < gain < 3 and rows[1]._drafter.expected_gain(8) == 0  # a 3-token match: at most 3 drafts
    assert cheap.plan(rows, 2, 16) == 4  # (2 + gain) / 2 tokens per row > 1, and 4 holds the draft
    assert dear.plan(rows, 2, 16) == 0  # ... < 2.5
    rows[0]._masked = True
    assert cheap.plan(rows, 2, 16) == 0  # a masked row does not draft


def test_the_width_with_the_most_tokens_per_cost_wins():
    class Costs:  # a verify step of width w costs 1 + w / 4 decode steps
        def ratio(self, rows, steps, width):
            return 1 + width / 4

    spec = Speculator("ngram", 8, costs=Costs())
    r = _Req([*range(1, 30), *range(1, 21)])  # a 20-token match
    spec.admit(r)
    spec.took(r, [21])
    r._drafter.length = 8
    r._drafter.draft(None, 8)
    for acceptance, width in ((0.99, 8), (0.7, 2), (0.3, 0)):
        r._drafter.accepted, r._drafter.trials = acceptance * 100, 100.0
        rates = {w: (1 + r._drafter.expected_gain(w)) / (1 + w / 4) for w in spec.widths}
        assert spec.plan([r], 1, 16) == width == (max(rates, key=rates.get) if max(rates.values()) > 1 else 0)


def test_widths_and_bad_settings():
    assert draft_widths(8) == (2, 4, 8) and draft_widths(5) == (2, 4, 5) and draft_widths(1) == (1,)
    spec = Speculator("suffix", 5)
    assert [spec.width(n) for n in (0, 1, 3, 5, 9)] == [2, 2, 4, 5, 5]
    with pytest.raises(KimiError, match="ngram or suffix"):
        Speculator("off")
    with pytest.raises(KimiError, match="off, ngram, suffix"):
        Speculator("eagle")
    with pytest.raises(KimiError, match="integer >= 1, got 0"):
        Speculator("ngram", 0)


def test_a_wider_step_is_tried_only_while_its_drafts_could_pay_for_the_narrower_ones_cost():
    costs = StepCosts()
    spec = Speculator("ngram", 8, costs=costs)
    r = _Req([*range(1, 30), *range(1, 21)])
    spec.admit(r)
    spec.took(r, [21])
    r._drafter.accepted, r._drafter.trials = 99.0, 100.0
    r._drafter.length = 2
    r._drafter.draft(None, 8)
    assert spec.plan([r], 1, 16) == 2  # nothing measured: the narrowest first
    for seconds in (9.0, 0.01, 0.01):
        costs.record("decode", 1, 16, 16 * seconds)  # the first of each is dropped (the compile)
        costs.record("verify", 1, 2, 6 * seconds)
    assert spec.plan([r], 1, 16) == 0  # 3 tokens for the price of 6: decode
    r._drafter.length = 4
    r._drafter.draft(None, 8)
    assert spec.plan([r], 1, 16) == 0  # 5 tokens would not pay for 6 steps either: width 4 is not tried
    r._drafter.length = 8
    r._drafter.draft(None, 8)
    assert spec.plan([r], 1, 16) == 8  # 9 might: width 8 gets measured
    costs.record("verify", 1, 8, 9.0)
    costs.record("verify", 1, 8, 0.07)
    assert spec.plan([r], 1, 16) == 8  # 8.6 tokens for the price of 7
    costs.record("verify", 1, 8, 0.2)  # 0.135 s on average now: 8.6 tokens for 13.5 steps
    assert spec.plan([r], 1, 16) == 0


def test_a_long_prompt_is_indexed_a_step_at_a_time(monkeypatch):
    from kimi_jax import drafting

    monkeypatch.setattr(drafting, "INDEX_STEP", 10)
    phrase = [100, 101, 102, 103, 104]
    drafter = RequestDrafter.for_prompt(phrase + list(range(30)) + phrase[:3], max_draft=8)
    drafter.length = 8
    assert drafter.own.indexed == 0
    assert drafter.draft(None, 8) == [103, 104, 0]  # the phrase at the start is indexed first
    assert drafter.own.indexed == 10
    drafter.extend([103])
    assert drafter.own.indexed == 10 and len(drafter.own.tokens) == 39
    for _ in range(3):
        drafter.draft(None, 8)
    assert drafter.own.indexed == 39  # caught up with the output too


def test_a_decode_step_costs_what_the_nearest_measured_block_says():
    costs = StepCosts()
    for kind, width, seconds in (("verify", 4, 9.0), ("verify", 4, 0.03), ("decode", 16, 9.0), ("decode", 16, 0.16)):
        costs.record(kind, 2, width, seconds)
    # A request's last block of 13 steps was never timed: a step costs what one of the 16-step block did.
    assert costs.ratio(2, 13, 4) == pytest.approx(0.03 / 0.01)
    assert costs.ratio(1, 13, 4) == 0.0  # other rows: nothing measured


def test_a_new_request_starts_from_the_acceptance_of_recent_drafts():
    spec = Speculator("ngram", 8, costs=FixedCosts(1.0))
    first = _Req([1, 2, 3, 4])
    spec.admit(first)
    assert first._drafter.length == 2 and first._drafter.acceptance == 0.5  # nothing known yet
    for _ in range(20):  # drafts of 8 that were all accepted
        spec.verified(first, [1] * 8, [1] * 9)
    second = _Req([5, 6, 7])
    spec.admit(second)
    assert second._drafter.length == 8 and second._drafter.acceptance > 0.9
    for _ in range(100):  # then drafts that all failed
        spec.verified(first, [1] * 8, [2])
    third = _Req([5, 6, 7])
    spec.admit(third)
    assert third._drafter.length == 2 and third._drafter.acceptance < 0.2
