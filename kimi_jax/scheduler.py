"""Continuous batching as plain Python: which requests run in which slots on which pages, what each
dispatch to the device computes, and what the tokens that come back mean. No JAX here: the engine
(engine.py) supplies a `Device` that runs the compiled programs, and the tests drive this same
policy with a mock device that makes tokens in numpy.

One `step()`:
  1. drop cancelled requests, then admit waiting ones into free slots: each takes the cached pages
     of the longest known prefix of its prompt, fresh pages for the rest, and a reservation for
     its completion (pages.py), so a running request never finds the pool empty;
  2. prefill one chunk (at most `prefill_rows` requests, `chunk` tokens each), so a long prompt
     never stalls the running streams for longer than one chunk;
  3. dispatch one decode block for the generating slots: they are packed into the smallest row
     bucket that holds them (idle slots cost nothing), and the block runs several steps on the
     device when nothing waits for a prefill (rows stop on the device at their stop ids and
     budgets, and a block ends as soon as none is left);
  4. read the oldest outputs while the device runs this iteration's work, hand the tokens to their
     requests, finish those that stopped, and free their slots and pages at once.

Between dispatches the host only knows an upper bound of what each row generated (the device may
have stopped it early); `_sampled` is that bound, exact whenever nothing of the row is in flight.
Constrained rows (a `constraint` with mask()/accept()/breaks, e.g. chat/constraint.py) need their
mask from the host before each constrained token: they run one step per dispatch and wait until
their previous tokens are read; while a constraint is free (mask() None) its row runs blocks like
any other, and the device halts it at a `breaks` id so the host can ask again.

Speculation (a `Speculator`, speculation.py): instead of a decode block, a dispatch may be one
verify step in which rows carry draft tokens (drafting.py) and keep those the model agrees with.
Drafts are made from a request's latest tokens, so a verify iteration first reads everything in
flight; rows without drafts (constrained rows while their constraint masks, requests whose drafts
keep failing) ride along and make one token.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable

import numpy as np

from kimi_jax.dispatches import DecodeWork, Device, PrefillWork, VerifyWork
from kimi_jax.errors import KimiError
from kimi_jax.pages import DISCARD_PAGE, PagePool, pages_for
from kimi_jax.sampling import SamplingParams, knob_arrays

# The most decode steps one dispatch runs (when every slot decodes; one step while a prompt is
# being prefilled and for constrained rows). 16 steps of K2 on 8 GPUs take ~15 ms at the memory
# roofline, short enough for smooth streaming.
DEFAULT_DECODE_BLOCK = 16
DEFAULT_CHUNK = 128  # prompt tokens per prefill row and dispatch


class QueueFull(KimiError):
    """The engine cannot take more requests now (every slot busy and the queue full)."""


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt in the engine: its generated `tokens` grow while it runs, `done` is set and
    `finish_reason` says why when it ends; timings are `time.perf_counter()` seconds."""

    prompt_ids: list[int]
    sampling: SamplingParams
    on_event: Callable | None = None
    constraint: object | None = None  # restricts tokens after its free phase (see module doc)
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled'
    cached_tokens: int = 0  # prompt tokens whose latents came from the prefix cache
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    # scheduler state
    _slot: int | None = None
    _pages: list[int] = dataclasses.field(default_factory=list)
    _reserve: int = 0  # pages still reserved for growth
    _written: int = 0  # prompt tokens dispatched to prefill
    _limit: int = 0  # tokens it may generate in all (max_new_tokens, cut by the context)
    _sampled: int = 0  # tokens sampled so far, counting dispatched steps as if none stopped early
    _inflight: int = 0  # dispatches holding it whose outputs are unread
    _halted: bool = False  # the device stopped it at a constraint boundary: re-arm before it runs
    _masked: bool = False  # its constraint restricts the next token
    _drafter: object | None = None  # drafting.RequestDrafter while it runs with speculation
    _cancel: bool = False

    @property
    def prompt_tokens(self) -> int:
        """Length of the prompt in tokens."""
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Stop generating; the slot and pages are freed at the engine's next iteration."""
        self._cancel = True

    @property
    def decoding(self) -> bool:
        """Whether its prompt is fully dispatched and it holds a slot: it generates."""
        return self._slot is not None and self._written == len(self.prompt_ids)


def row_buckets(max_batch: int, shards: int = 1) -> list[int]:
    """Decode batch sizes the engine compiles: per data shard, powers of two below its slot count
    and the count itself (times the shards)."""
    per = max_batch // shards
    return [b * shards for b in sorted({1 << i for i in range(per.bit_length()) if 1 << i < per} | {per})]


class Scheduler:
    """The host-side policy of continuous batching over a paged cache (see the module doc)."""

    def __init__(self, device: Device, *, max_batch: int, max_len: int, chunk: int, pool: PagePool,
                 prefill_rows: int = 1, decode_block: int = 1, speculator=None):
        if max_batch % pool.shards:
            raise KimiError(f"max_batch {max_batch} must be a multiple of the data shards ({pool.shards})")
        self.device = device
        self.max_batch, self.max_len, self.chunk, self.prefill_rows = max_batch, max_len, chunk, prefill_rows
        self.pool, self.page_size = pool, pool.page_size
        self.decode_block = decode_block
        self.buckets = row_buckets(max_batch, pool.shards)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []  # admitted, prompt not fully dispatched (admission order)
        self.pending: collections.deque = collections.deque()  # (handle, work, started, timed) unread
        self.spec = speculator  # speculation.Speculator, or None: never verify
        self._width = 0  # this iteration's verify width, 0: none (decided before reading what is in flight)
        self._started = self._last_read = 0.0
        self._timed = True  # this iteration's dispatch alone occupies the device (no prefill with it)
        self.table = np.full((max_batch, pages_for(max_len, self.page_size)), DISCARD_PAGE, np.int32)
        self.knobs = knob_arrays([SamplingParams()] * max_batch)
        self._table_dirty = self._knobs_dirty = True
        self.stats = collections.Counter()
        self.recent = collections.deque(maxlen=256)  # (time, generated tokens) per read

    # ---- the iteration ---------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration (see the module doc). Returns whether any work remains."""
        self._started = time.perf_counter()
        self._cancel_requested()
        self._admit()
        self._width = self._verify_width()
        if self._width or any(self._waits_for_reads(r) for r in self.slots if r is not None):
            self.drain()
        dispatched = self._dispatch_prefill()
        self._timed = not dispatched
        dispatched |= self._dispatch_decode()
        while len(self.pending) > (1 if dispatched else 0):
            self._read_oldest()
        return self.busy()

    def warm_up(self, masks: bool = False) -> None:
        """Run each program the device compiles for this scheduler on nothing (see
        BatchEngine.warm_up): a prefill of padding rows, zero decode steps per row bucket, and with
        a speculator a verify step of padding rows per bucket and draft width (none masked: no verify
        step runs while a row is masked)."""
        if self.busy():
            raise RuntimeError("warm_up() is for an idle engine")
        n, pad = self.prefill_rows, self.max_batch
        zeros = np.zeros(n, np.int32)
        self._sync()
        handles = [self.device.prefill(PrefillWork(np.zeros((n, self.chunk), np.int32), np.full(n, pad, np.int32),
                                                   zeros, zeros, zeros - 1, None, []))]
        for bucket in self.buckets:
            rows = np.full(bucket, pad, np.int32)
            for mask in [None] + ([self._allow_all(bucket)] if masks else []):
                handles.append(self.device.decode(DecodeWork(rows, 0, mask, [])))
            for width in self.spec.widths if self.spec is not None else ():
                handles.append(self.device.verify(VerifyWork(rows, np.zeros((bucket, width), np.int32),
                                                             np.zeros(bucket, np.int32), [], {})))
        for h in handles:
            self.device.read(h)

    def busy(self) -> bool:
        return bool(self.waiting or self.pending or any(r is not None for r in self.slots))

    def drain(self) -> None:
        """Read every dispatched output."""
        while self.pending:
            self._read_oldest()

    def shard_of(self, slot: int) -> int:
        return slot * self.pool.shards // self.max_batch

    # ---- admission -------------------------------------------------------------------------------
    def _cancel_requested(self) -> None:
        for r in [r for r in self.waiting if r._cancel]:
            self.waiting.remove(r)
            self.finish(r, "cancelled")
        for r in self.slots:
            if r is not None and r._cancel and r.finish_reason is None:
                self.finish(r, "cancelled")

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s, r in enumerate(self.slots) if r is None]
            if not free:
                return
            r, slot = self.waiting[0], free[0]
            shard, ps, n = self.shard_of(slot), self.page_size, len(self.waiting[0].prompt_ids)
            limit = min(r.sampling.max_new_tokens, self.max_len - n)
            # At least the last prompt token is recomputed: its logits give the first new token.
            shared = self.pool.match(r.prompt_ids, shard, limit=(n - 1) // ps)
            reserve = pages_for(n + limit, ps) - pages_for(n, ps)
            pages = self.pool.admit(shared, pages_for(n, ps) - len(shared), reserve, shard)
            if pages is None:
                return  # not enough room: wait for running requests to finish
            self.waiting.popleft()
            r._slot, r._pages, r._reserve, r._limit = slot, pages, reserve, limit
            r._written = r.cached_tokens = len(shared) * ps
            self.stats["prompt_tokens"] += n
            self.stats["cached_tokens"] += r.cached_tokens
            self.slots[slot] = r
            self.table[slot] = DISCARD_PAGE
            self.table[slot, :len(pages)] = pages
            self._table_dirty = True
            breaks = tuple(r.constraint.breaks) if r.constraint is not None else ()
            halts = tuple(dict.fromkeys(r.sampling.stop_ids + breaks))
            for k, v in knob_arrays([r.sampling], [halts]).items():
                self.knobs[k][slot] = v[0]
            self._knobs_dirty = True
            self.prefilling.append(r)
            if self.spec is not None:
                self.spec.admit(r)

    def _sync(self) -> None:
        if self._table_dirty:
            self.device.set_table(self.table)
            self._table_dirty = False
        if self._knobs_dirty:
            self.device.set_knobs(self.knobs)
            self._knobs_dirty = False

    # ---- prefill ---------------------------------------------------------------------------------
    def _dispatch_prefill(self) -> bool:
        rows = self.prefilling[:self.prefill_rows]
        if not rows:
            return False
        n, c = self.prefill_rows, self.chunk
        tokens = np.zeros((n, c), np.int32)
        slots = np.full(n, self.max_batch, np.int32)  # padding rows name no slot
        q_start, n_valid = np.zeros(n, np.int32), np.zeros(n, np.int32)
        finish_budget = np.full(n, -1, np.int32)
        finishing, masks = [], {}
        for i, r in enumerate(rows):
            part = r.prompt_ids[r._written:r._written + c]
            tokens[i, :len(part)] = part
            slots[i], q_start[i], n_valid[i] = r._slot, r._written, len(part)
            r._written += len(part)
            if r._written == len(r.prompt_ids):
                self.prefilling.remove(r)
                finish_budget[i] = r._limit - 1
                r._sampled, r._inflight = 1, 1
                finishing.append((i, r))
                if r.constraint is not None:
                    masks[i] = self._next_mask(r)
        work = PrefillWork(tokens, slots, q_start, n_valid, finish_budget, self._mask_rows(masks, n), finishing)
        self._sync()
        handle = self.device.prefill(work)
        if finishing:
            self.pending.append((handle, work, self._started, False))
        return True

    # ---- decode ----------------------------------------------------------------------------------
    def _waits_for_reads(self, r: Request) -> bool:
        """A constrained row must have every token read before its constraint can say what comes next."""
        return r.decoding and r._inflight > 0 and (r._halted or r._masked)

    def _ready(self) -> list[Request]:
        return [r for r in self.slots if r is not None and r.decoding and r.finish_reason is None
                and r._sampled < r._limit and not self._waits_for_reads(r)]

    def _block_steps(self, ready: list[Request], masked: bool) -> int:
        """Short blocks while a prompt is being prefilled, so its chunks keep coming (a request that
        waits for a slot or pages gains nothing from them), and while a row is masked."""
        if masked or self.prefilling:
            return 1
        return min(self.decode_block, max(r._limit - r._sampled for r in ready))

    def _verify_width(self) -> int:
        """The draft width this iteration should verify, or 0 (speculation.Speculator.plan)."""
        ready = self._ready() if self.spec is not None else []
        if not ready:
            return 0
        return self.spec.plan(ready, self._pack([r._slot for r in ready])[0].size, self._block_steps(ready, False))

    def _dispatch_decode(self) -> bool:
        ready = self._ready()
        if not ready:
            return False
        masks, resume = {}, []
        for r in ready:
            if r.constraint is not None and (r._halted or r._masked):
                masks[r._slot] = self._next_mask(r)
                if r._halted:
                    resume.append(r._slot)
                    r._halted = False
        if resume:
            self.device.resume(resume)
        # No verify step while a constraint masks a row's next token: its grammar says what that one
        # token may be, and the verify programs then need no masked variants.
        drafts = {} if not self._width or masks else self.spec.drafts(ready, lambda r: r._limit - r._sampled,
                                                                        self._width)
        if drafts:
            return self._dispatch_verify(ready, drafts)
        steps = self._block_steps(ready, any(m is not None for m in masks.values()))
        rows, order = self._pack([r._slot for r in ready])
        requests = []
        for r in ready:
            n = min(steps, r._limit - r._sampled)
            self._grow(r, len(r.prompt_ids) + r._sampled - 1 + n - 1)  # the last position this block feeds
            r._sampled += n
            r._inflight += 1
            requests.append((order[r._slot], r))
        mask = None
        if masks:
            mask = self._mask_rows({order[s]: m for s, m in masks.items()}, len(rows))
        work = DecodeWork(rows, steps, mask, requests)
        self._sync()
        self.pending.append((self.device.decode(work), work, self._started, self._timed))
        return True

    def _dispatch_verify(self, ready: list[Request], drafts: dict) -> bool:
        """One verify step: every ready row, with its draft if it has one (all were read)."""
        rows, order = self._pack([r._slot for r in ready])
        width = self.spec.width(max(len(d) for d in drafts.values()))
        draft_rows = np.zeros((len(rows), width), np.int32)
        n_draft = np.zeros(len(rows), np.int32)
        requests = []
        for r in ready:
            i, d = order[r._slot], drafts.get(r, [])
            draft_rows[i, :len(d)], n_draft[i] = d, len(d)
            self._grow(r, len(r.prompt_ids) + r._sampled - 1 + len(d))  # the last position it feeds
            r._sampled += 1 + len(d)
            r._inflight += 1
            requests.append((i, r))
        work = VerifyWork(rows, draft_rows, n_draft, requests, drafts)
        self._sync()
        self.pending.append((self.device.verify(work), work, self._started, self._timed))
        return True

    def _pack(self, slots: list[int]) -> tuple[np.ndarray, dict[int, int]]:
        """Rows for `slots` in the smallest bucket that holds them, each data shard's slots in its
        own part of the rows (their cache pages live on that shard's devices)."""
        shards = self.pool.shards
        by_shard = [[s for s in slots if self.shard_of(s) == d] for d in range(shards)]
        most = max(len(b) for b in by_shard)
        per = next(b for b in self.buckets if b // shards >= most) // shards
        rows = np.full(per * shards, self.max_batch, np.int32)
        for d, group in enumerate(by_shard):
            rows[d * per:d * per + len(group)] = group
        return rows, {int(s): i for i, s in enumerate(rows) if s < self.max_batch}

    def _grow(self, r: Request, last_position: int) -> None:
        """Pages up to the one holding `last_position`, out of the request's reservation."""
        while last_position // self.page_size >= len(r._pages):
            r._pages.append(self.pool.grow(self.shard_of(r._slot)))
            r._reserve -= 1
            self.table[r._slot, len(r._pages) - 1] = r._pages[-1]
            self._table_dirty = True

    def _next_mask(self, r: Request):
        mask = r.constraint.mask()
        r._masked = mask is not None
        return mask

    def _mask_rows(self, masks: dict, n_rows: int) -> np.ndarray | None:
        """Bitmask words for n_rows rows: the given rows' masks, every token allowed elsewhere."""
        masks = {i: m for i, m in masks.items() if m is not None}
        if not masks:
            return None
        out = self._allow_all(n_rows)
        for i, m in masks.items():
            out[i] = m
        return out

    def _allow_all(self, n_rows: int) -> np.ndarray:
        return np.full((n_rows, -(-self.device.vocab_size // 32)), -1, np.int32)

    # ---- reading ---------------------------------------------------------------------------------
    def _read_oldest(self) -> None:
        handle, work, started, timed = self.pending.popleft()
        host = self.device.read(handle)
        now = time.perf_counter()
        if timed and self.spec is not None:
            # Between the previous read and this one the device ran this dispatch alone (or sat idle
            # while the host prepared it): its cost in wall time, the host's bubble included.
            kind, width = ("verify", work.drafts.shape[1]) if isinstance(work, VerifyWork) else ("decode", work.steps)
            self.spec.costs.record(kind, len(work.rows), width, now - max(self._last_read, started))
        self._last_read = now
        if isinstance(work, VerifyWork):
            self.spec.stats["verify_steps"] += 1
        count = 0
        if isinstance(work, PrefillWork):
            for i, r in work.finishing:
                count += self._take(r, [int(host[i])], now)
        else:
            for i, r in work.requests:
                column = host[:, i]
                tokens = [int(t) for t in column[column >= 0]]
                if isinstance(work, VerifyWork) and r.finish_reason is None:
                    drafted = work.drafted.get(r, [])
                    self.spec.verified(r, drafted, tokens)
                    r._sampled -= 1 + len(drafted) - len(tokens)  # it was counted as if all were accepted
                count += self._take(r, tokens, now)
        self.stats["generated_tokens"] += count
        self.recent.append((now, count))

    def _take(self, r: Request, tokens: list[int], now: float) -> int:
        """Hand a request the tokens one dispatch made for it; finish it if it stopped."""
        r._inflight -= 1
        if r.finish_reason is not None:
            return 0  # a dispatch made before the request was cancelled
        reason = None
        for n, tok in enumerate(tokens):
            r.tokens.append(tok)
            if r.constraint is not None:
                r.constraint.accept(tok)
            if tok in r.sampling.stop_ids:
                reason = "stop"
            elif len(r.tokens) >= r._limit:
                reason = "length"
            elif r.constraint is not None and tok in r.constraint.breaks:
                r._halted = True  # the device stopped the row here; it resumes once all is read
            else:
                continue
            tokens = tokens[:n + 1]
            break
        if r._halted or r._masked:
            r._sampled = len(r.tokens)  # the device made nothing past the boundary
        if self.spec is not None and reason is None:
            self.spec.took(r, tokens)
        if tokens:
            r.first_token_at = r.first_token_at or now
            if r.on_event is not None:
                r.on_event(r, tokens, False)
        if reason:
            self.finish(r, reason)
        return len(tokens)

    def finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.finished_at = time.perf_counter()
        if r._slot is not None:
            slot = r._slot
            if r in self.prefilling:
                self.prefilling.remove(r)
            # Latents held: the prompt as dispatched, then every generated token but the last (a
            # sampled token is written only when it is fed back).
            written = r._written + max(len(r.tokens) - 1, 0) if r.decoding else r._written
            self.pool.release(r._pages, r.prompt_ids + r.tokens, written, r._reserve, self.shard_of(slot))
            self.slots[slot] = None
            r._slot, r._pages, r._reserve = None, [], 0
        if self.spec is not None and r._drafter is not None:
            self.spec.finished(r)
        self.stats["finished"] += 1
        if r.on_event is not None:
            r.on_event(r, [], True)
        r.done.set()
