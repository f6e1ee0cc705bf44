"""When to verify drafts instead of decoding, and the bookkeeping of drafts: the speculative half of
the scheduler's policy. Plain Python (no JAX), like scheduler.py, which calls it.

A verify step (steps.verify_step) feeds each row its last token and up to K drafts and keeps what
the model agrees with plus one token: 1 + a tokens per row for a accepted drafts. A decode block
makes one token per row per step. Which of the two gives more tokens per second depends on the
device and the load:

  - on a GPU or TPU a step is bound by reading the weights, so feeding K + 1 tokens instead of one
    costs little until the batch's tokens fill the matrix units: verifying wins whenever drafts
    are accepted, except with many rows and long drafts;
  - on a CPU (and for big batches anywhere) the cost grows with the tokens fed;
  - a verify step needs the host to have read its rows' previous tokens (it drafts from them), so
    it cannot be queued behind the previous dispatch as a decode block is: each verify step pays
    the host's read-draft-dispatch time on top of the device's.

So the policy measures. `StepCosts` keeps the wall time between the reads of consecutive
dispatches (the device's time per dispatch when the host keeps up, plus the host's bubble when it
does not) per kind, row bucket and width, and `Speculator.plan` verifies when the tokens a
verify step should make per row (1 + the sum of a^i over each request's draft, with a its measured
acceptance) exceed the measured cost of a verify step in decode steps, and picks the draft width
that makes the most tokens per second: for a mixture of experts a verify step's cost grows with the
tokens fed even on an accelerator, since every token brings its own experts. Unmeasured shapes are
tried once, and a measurement that has not been refreshed for a while is taken again, so the choice
follows the load: under full load on a CPU speculation switches itself off.
"""

from __future__ import annotations

import dataclasses
import math

from kimi_jax.drafting import RequestDrafter, SuffixIndex
from kimi_jax.errors import KimiError

SPECULATE_MODES = ("off", "ngram", "suffix")  # ngram: the request's own tokens; suffix: also recent outputs
# Off until a machine shows it paying: on the 2-core CPU a verify step costs several decode steps
# of a 16-step block (BENCHMARKS.md), and the GPU gain is a projection.
DEFAULT_SPECULATE = "off"
DEFAULT_DRAFT_TOKENS = 8
SHARED_CAPACITY = 1 << 16  # tokens of recent outputs the shared index keeps
STALE_AFTER = 200  # measurements of other shapes after which one is taken again (at first)
MAX_STALE_AFTER = 200 * 64


def check_settings(mode: str, max_draft: int) -> None:
    """A KimiError naming what is wrong with a speculation mode or draft length."""
    if mode not in SPECULATE_MODES:
        raise KimiError(f"speculate must be one of {', '.join(SPECULATE_MODES)}; got {mode!r}")
    if not isinstance(max_draft, int) or max_draft < 1:
        raise KimiError(f"draft tokens per step must be an integer >= 1, got {max_draft}")


def add_arguments(parser) -> None:
    """--speculate and --draft-tokens, for the CLI and the server."""
    parser.add_argument("--speculate", choices=SPECULATE_MODES, default=DEFAULT_SPECULATE,
                        help="speculative decoding: draft tokens from the request's own prompt and output (ngram) "
                             "and also from recent outputs (suffix), verify several per step when that is faster "
                             f"(default {DEFAULT_SPECULATE}); off: one token per step")
    parser.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS,
                        help=f"most draft tokens per request and step (default {DEFAULT_DRAFT_TOKENS})")


def draft_widths(max_draft: int) -> tuple[int, ...]:
    """Draft widths the verify programs are compiled for: powers of two from 2 up to max_draft, and
    it (each width is one more program per row bucket)."""
    return tuple(sorted({1 << i for i in range(1, max_draft.bit_length()) if 1 << i < max_draft} | {max_draft}))


class StepCosts:
    """Measured seconds per dispatch, keyed by ("decode", rows, steps) or ("verify", rows, width).
    The first measurement of each key is dropped: it includes the compilation.

    A measurement goes stale after STALE_AFTER measurements of other keys and is then taken again
    (the load may have changed). A key that is only ever measured because it went stale is one the
    policy keeps turning down, and each such try costs a step that makes fewer tokens than a decode
    block: each time a key is taken again, it stays fresh twice as long (up to MAX_STALE_AFTER)."""

    def __init__(self):
        # key -> (mean seconds or None, tick measured, measurements of other keys it stays fresh for)
        self._seen: dict[tuple, tuple[float | None, int, int]] = {}
        self._tick = 0

    def record(self, kind: str, rows: int, width: int, seconds: float) -> None:
        self._tick += 1
        key = (kind, rows, width)
        if key not in self._seen:
            self._seen[key] = (None, self._tick, STALE_AFTER)
            return
        mean, tick, life = self._seen[key]
        if mean is None:
            self._seen[key] = (seconds, self._tick, life)
            return
        if self._tick - tick > life:  # taken again after it went stale
            life = min(2 * life, MAX_STALE_AFTER)
        self._seen[key] = (0.5 * mean + 0.5 * seconds, self._tick, life)

    def _fresh(self, key) -> float | None:
        mean, tick, life = self._seen.get(key, (None, 0, 0))
        return mean if mean is not None and self._tick - tick <= life else None

    def ratio(self, rows: int, steps: int, width: int) -> float:
        """A verify step's cost in decode steps (of a block of `steps`) at `rows` rows; 0 when the
        verify step needs measuring, infinity when the decode block does."""
        verify = self._fresh(("verify", rows, width))
        if verify is None:
            return 0.0
        # A decode step's cost from the block of `steps` steps, or the nearest measured length (a
        # request's last block is shorter; per step they cost about the same).
        blocks = sorted((abs(n - steps), n) for kind, r, n in self._seen if kind == "decode" and r == rows
                        and self._fresh((kind, r, n)) is not None)
        if not blocks:
            return math.inf
        n = blocks[0][1]
        return verify / (self._fresh(("decode", rows, n)) / n)


@dataclasses.dataclass
class FixedCosts:
    """A verify step that always costs `ratio` decode steps: deterministic choices (tests, and
    several hosts, whose schedulers must agree without sharing clocks)."""

    value: float = 1.0

    def record(self, kind: str, rows: int, width: int, seconds: float) -> None:
        pass

    def ratio(self, rows: int, steps: int, width: int) -> float:
        return self.value


class Speculator:
    """Drafts for the scheduler's requests and the choice between a verify step and a decode block
    (see the module doc). `mode`: "ngram" drafts from each request's own tokens, "suffix" also from
    the recent outputs of other requests."""

    def __init__(self, mode: str = "suffix", max_draft: int = DEFAULT_DRAFT_TOKENS, costs=None,
                 shared_capacity: int = SHARED_CAPACITY):
        check_settings(mode, max_draft)
        if mode == "off":
            raise KimiError("a Speculator drafts: its mode must be ngram or suffix")
        self.mode, self.max_draft = mode, max_draft
        self.widths = draft_widths(max_draft)
        self.costs = costs if costs is not None else StepCosts()
        self.shared = SuffixIndex(shared_capacity) if mode == "suffix" else None
        self.stats = dict(drafted_tokens=0, accepted_tokens=0, verify_steps=0, verify_rows=0, verify_tokens=0)
        # Recent drafts' acceptance over all requests (decayed counts, as RequestDrafter.observe
        # keeps them per request): a new request starts from it, not from a guess. On text that
        # copies, a new request then drafts long from its first step instead of earning it.
        self._accepted, self._trials = 1.0, 2.0

    # ---- a request's life -------------------------------------------------------------------------
    def admit(self, r) -> None:
        r._drafter = RequestDrafter.for_prompt(r.prompt_ids, self.max_draft, self._accepted / self._trials)

    def eligible(self, r) -> bool:
        """Whether the request may draft now: not while its constraint restricts the next token or
        waits at a boundary, nor while its drafts keep failing."""
        return r._drafter is not None and not (r._masked or r._halted) and not r._drafter.paused()

    def took(self, r, tokens: list[int]) -> None:
        """Tokens a request got: they extend its own index, and a lookup says whether a draft
        would follow them (for the next `plan`)."""
        if r._drafter is not None and tokens:
            r._drafter.extend(tokens)
            r._drafter.draft(self.shared, self.max_draft)

    def verified(self, r, drafted: list[int], tokens: list[int]) -> None:
        """A verify step's tokens for a request that drafted `drafted`."""
        accepted = 0
        while accepted < min(len(drafted), len(tokens)) and drafted[accepted] == tokens[accepted]:
            accepted += 1
        r._drafter.observe(len(drafted), accepted)
        if drafted:
            self._accepted = 0.95 * self._accepted + accepted
            self._trials = 0.95 * self._trials + accepted + (accepted < len(drafted))
        self.stats["drafted_tokens"] += len(drafted)
        self.stats["accepted_tokens"] += accepted
        self.stats["verify_rows"] += 1
        self.stats["verify_tokens"] += len(tokens)

    def finished(self, r) -> None:
        if self.shared is not None and r.tokens:
            self.shared.add(r.tokens)
        r._drafter = None

    # ---- the choice -------------------------------------------------------------------------------
    def plan(self, rows: list, bucket: int, steps: int) -> int:
        """The draft width of a verify step for `rows` (packed into `bucket` rows), or 0 when a
        decode block of `steps` steps should run instead, judging by each request's latest lookup:
        the width whose expected tokens per row, over its cost in decode steps, is highest and
        above the decode block's 1. Widths are measured narrowest first, a wider one only while its
        drafts could pay for the narrower one's cost."""
        candidates = [r for r in rows if self.eligible(r)]
        best, best_rate, narrower_gain, narrower_cost = 0, 1.0, 0.0, 0.0
        for width in self.widths:
            gain = sum(r._drafter.expected_gain(width) for r in candidates)
            if gain <= narrower_gain:
                break  # a wider step would carry no more drafts
            made = (len(rows) + gain) / len(rows)  # tokens per row
            ratio = self.costs.ratio(bucket, steps, width)
            if ratio == 0:
                # Not measured (or long ago). A wider step costs at least what the narrower one
                # did: measure it (compiling it, the first time) only if at that cost it would win.
                if not narrower_cost or made / narrower_cost > best_rate:
                    return width
                continue
            if made / ratio > best_rate:
                best, best_rate = width, made / ratio
            narrower_gain, narrower_cost = gain, ratio
        return best

    def drafts(self, rows: list, remaining, width: int) -> dict:
        """request -> its draft (non-empty, at most `width`) for the eligible `rows`; `remaining(r)`:
        tokens it may still generate (a draft is at most one fewer: the step adds a token)."""
        out = {}
        for r in rows:
            if self.eligible(r) and not r._inflight:  # a draft follows the request's latest token
                d = r._drafter.draft(self.shared, min(width, remaining(r) - 1))
                if d:
                    out[r] = d
        return out

    def width(self, longest: int) -> int:
        """The compiled draft width that holds `longest` tokens."""
        return next(w for w in self.widths if w >= min(max(longest, 1), self.max_draft))
