"""Continuous batching: many requests share a fixed number of decode slots and one paged cache.

    engine = BatchEngine(model, max_batch=8, max_len=4096)
    req = engine.submit(prompt_ids, SamplingParams(...), on_event)   # from any thread
    engine.start()        # a background thread steps while there is work ... or, synchronously:
    engine.wait([req])    # steps in this thread when no background thread runs
    engine.generate([prompt_ids, ...], sampling)                        # -> finished Requests

Each `step()` is one iteration of the scheduler:
  1. admit waiting requests into free slots: take the cached pages of the longest known prefix
     (pages.py), allocate pages for the rest of the prompt, reserve pages for the completion;
  2. prefill one chunk of tokens (at most `prefill_rows` requests, `chunk` tokens each), so a long
     prompt never stalls the running streams for longer than one chunk;
  3. run one decode step for every slot that is generating (one compiled program whatever the mix
     of lengths; idle slots compute and discard);
  4. read the tokens of the previous dispatch (the device is already busy with this one), hand them
     to their requests, finish those that stopped, and free their slots and pages at once.

The engine sees token ids only; stop strings, chat formatting and tool calls live above it.

Several hosts. Every process runs the same scheduler on the same inputs, so their decisions agree
and each host drives its own devices through the same compiled steps. Either every process submits
the same requests itself (the CLI), or, with `mirror=True` (the server), only process 0 takes
requests: at the start of each iteration it sends the new ones and the cancellations to the others,
which run `follow()` until process 0 stops.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kernels_pallas.backends import backend_for
from kimi_jax.cache import DISCARD_PAGE, PagedCache, pages_for
from kimi_jax.distributed import broadcast_from_main, global_array, is_main, to_host
from kimi_jax.engine import decode_step, prefill_step, put_rows
from kimi_jax.errors import KimiError
from kimi_jax.model import KimiK2
from kimi_jax.pages import PagePool
from kimi_jax.sampling import SamplingParams, knob_arrays
from kimi_jax.sharding import platform_of


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
    _written: int = 0  # tokens whose latents are (or will be, in dispatch order) in the cache
    _dispatched: int = 0  # tokens sampled on the device so far
    _cancel: bool = False

    @property
    def prompt_tokens(self) -> int:
        """Length of the prompt in tokens."""
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Stop generating; the slot and pages are freed at the engine's next iteration."""
        self._cancel = True


class BatchEngine:
    """Runs requests of token ids through a model with continuous batching over a paged cache
    (see the module docstring); `generate` for a batch, `submit`/`wait`/`start` for a stream."""

    def __init__(self, model: KimiK2, *, max_batch: int = 8, max_len: int = 4096, chunk: int = 128,
                 page_size: int | None = None, n_pages: int | None = None, prefill_rows: int = 1,
                 max_queue: int = 64, mesh: Mesh | None = None, impl: str | None = None, mirror: bool = False):
        """`impl`: the kernels (kernels_pallas.ops IMPLS); default: the best for the mesh's devices.
        `page_size`: tokens per cache page (default: what the devices read best, backend_for).
        `mirror`: process 0's requests are replayed on every other process (several hosts)."""
        if max_batch < 1 or chunk < 1 or prefill_rows < 1:
            raise KimiError("max_batch, chunk and prefill_rows must be >= 1")
        data = mesh.shape["data"] if mesh is not None else 1
        if max_batch % data:
            raise KimiError(f"max_batch {max_batch} must be a multiple of the mesh's data axis ({data})")
        self.cfg = model.cfg
        self.max_batch, self.max_len, self.chunk, self.prefill_rows = max_batch, max_len, chunk, prefill_rows
        self.max_queue = max_queue
        self.mesh = mesh
        backend = backend_for(platform_of(mesh))
        self.impl = impl or backend.impl
        page_order, page_size = backend.page_order, page_size or backend.page_size
        self.graphdef, self.state = nnx.split(model)
        per_seq = pages_for(max_len, page_size)
        # Room for every slot at full length plus as much again for cached prefixes, split evenly
        # over the data shards, each with one page that is never handed out (pages.py).
        n_pages = n_pages or data * (1 + -(-2 * max_batch * per_seq // data))
        self.pool = PagePool(n_pages, page_size, shards=data)
        self.cache = PagedCache.create(self.cfg, slots=max_batch, max_len=max_len, page_size=page_size,
                                       n_pages=n_pages, dtype=model.dtype, mesh=mesh, page_order=page_order)
        self.page_size = page_size
        self._table = np.full((max_batch, per_seq), DISCARD_PAGE, np.int32)
        self._table_dirty = False
        self._knobs = knob_arrays([SamplingParams()] * max_batch)
        self._knobs_dev = None
        self._active = np.zeros(max_batch, bool)
        self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh else \
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self._tokens = global_array(np.zeros(max_batch, np.int32), self._replicated)
        self._slots: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Request] = []  # admitted, prompt not fully written yet (admission order)
        self._pending: collections.deque = collections.deque()  # dispatched outputs not yet read
        self._inbox: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self.mirror = mirror and jax.process_count() > 1
        self._stopped = False
        self.stats = collections.Counter()
        self._recent = collections.deque(maxlen=256)  # (time, generated tokens) per read

    # ---- public API -----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, on_event: Callable | None = None) -> Request:
        """Queue a request (thread-safe). `on_event(request, new_tokens, finished)` is called from the
        engine's thread whenever the request got tokens, and once with finished=True at its end."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise KimiError("empty prompt: give at least one token")
        if len(prompt) >= self.max_len:
            raise KimiError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens "
                            "(one token must be left to generate)")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise KimiError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        request = Request(prompt, sampling, on_event)
        with self._lock:
            if len(self._waiting) + len(self._inbox) >= self.max_queue:
                raise QueueFull(f"the engine is full: {self.max_batch} requests running and {self.max_queue} queued")
            self._inbox.append(request)
            self._wake.notify()
        return request

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Request]:
        """Run prompts to completion and return their requests (token ids in `.tokens`). Any number
        of prompts: while the queue is full, the oldest running request is finished first."""
        requests = []
        for prompt in prompts:
            while True:
                try:
                    requests.append(self.submit(prompt, sampling))
                    break
                except QueueFull:
                    self._advance(next(r for r in requests if not r.done.is_set()))
        self.wait(requests)
        return requests

    def wait(self, requests: Sequence[Request]) -> None:
        """Block until the requests finish: stepping here, or waiting for the background thread."""
        for r in requests:
            while not r.done.is_set():
                self._advance(r)

    def _advance(self, request: Request) -> None:
        if self._thread is not None:
            request.done.wait(0.05)
        elif not self.step() and not request.done.is_set():
            raise RuntimeError(f"engine idle but request {request.id} unfinished")

    def start(self) -> None:
        """Step in a background thread while there is work (the server's mode)."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="kimi-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step (requests stay where they are)."""
        with self._lock:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._inbox and not self._busy():
                    # Mirrored: the other processes wait in a collective for every iteration, so
                    # even an idle engine steps now and then to keep them from timing out.
                    if not self._wake.wait(timeout=1.0) and self.mirror:
                        break
                running = self._running
            if not running:
                if self.mirror:
                    self.step()  # tells the other processes to stop
                return
            self.step()

    def metrics(self) -> dict:
        """A snapshot of load and throughput: slots, queue, pages, prefix-cache hits, token counts
        and the generation rate over the last 10 seconds."""
        busy = sum(r is not None for r in self._slots)
        now = time.perf_counter()
        window = [(t, n) for t, n in self._recent if now - t < 10.0]
        rate = sum(n for _, n in window) / (now - window[0][0]) if len(window) > 1 else 0.0
        prompt = self.stats["prompt_tokens"]
        return {
            "slots_busy": busy, "slots_total": self.max_batch, "queue_len": len(self._waiting) + len(self._inbox),
            "pages_used": self.pool.used(), "pages_cached": self.pool.cached(),
            "pages_total": self.pool.capacity * self.pool.shards, "page_size": self.page_size,
            "prefix_cache_hit_rate": self.stats["cached_tokens"] / prompt if prompt else 0.0,
            "prompt_tokens": prompt, "cached_tokens": self.stats["cached_tokens"],
            "generated_tokens": self.stats["generated_tokens"], "requests_finished": self.stats["finished"],
            "tokens_per_second": rate,
        }

    # ---- one iteration --------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduler iteration. Returns whether any work remains."""
        with self._step_lock:
            with self._lock:
                new, self._inbox = self._inbox, []
            if self.mirror:
                new = self._mirror(new)
                if new is None:
                    return False
            self._waiting.extend(new)
            self._cancel_requested()
            self._admit()
            dispatched = self._prefill_chunk()
            dispatched |= self._decode()
            # Read what was dispatched before this iteration while the device runs this one; with
            # nothing new in flight, read everything.
            while len(self._pending) > (1 if dispatched else 0):
                self._read(*self._pending.popleft())
            return self._busy()

    def _mirror(self, new: list[Request]) -> list[Request] | None:
        """Process 0's new requests and cancellations, on every process. None: process 0 stopped."""
        live = [r for r in [*self._slots, *self._waiting, *new] if r is not None]
        message = broadcast_from_main({
            "stop": not (self._running or self._thread is None),
            "new": [(r.id, r.prompt_ids, r.sampling) for r in new],
            "cancel": [r.id for r in live if r._cancel],
        })
        if message["stop"]:
            self._stopped = True
            return None
        if not is_main():
            new = [Request(prompt, sampling, id=rid) for rid, prompt, sampling in message["new"]]
            by_id = {r.id: r for r in [*live, *new]}
            for rid in message["cancel"]:
                by_id[rid].cancel()
        return new

    def follow(self) -> None:
        """On processes other than 0 of a mirrored engine: step in lockstep until process 0 stops."""
        while not self._stopped:
            self.step()

    def _busy(self) -> bool:
        return bool(self._waiting or self._inbox or self._pending or any(r is not None for r in self._slots))

    def _shard(self, slot: int) -> int:
        return slot * self.pool.shards // self.max_batch

    def _cancel_requested(self) -> None:
        for r in [r for r in self._waiting if r._cancel]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in self._slots:
            if r is not None and r._cancel and r.finish_reason is None:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s, r in enumerate(self._slots) if r is None]
            if not free:
                return
            r = self._waiting[0]
            slot = free[0]
            shard = self._shard(slot)
            ps = self.page_size
            total = min(self.max_len, len(r.prompt_ids) + r.sampling.max_new_tokens)
            # At least the last prompt token is recomputed: its logits give the first new token.
            shared = self.pool.match(r.prompt_ids, shard, limit=(len(r.prompt_ids) - 1) // ps)
            need_now = pages_for(len(r.prompt_ids), ps) - len(shared)
            reserve = pages_for(total, ps) - pages_for(len(r.prompt_ids), ps)
            pages = self.pool.admit(shared, need_now, reserve, shard)
            if pages is None:
                return  # not enough room: wait for running requests to finish
            self._waiting.popleft()
            r._slot, r._pages, r._reserve = slot, pages, reserve
            r._written = r.cached_tokens = len(shared) * ps
            self.stats["prompt_tokens"] += len(r.prompt_ids)
            self.stats["cached_tokens"] += r.cached_tokens
            self._slots[slot] = r
            self._table[slot] = DISCARD_PAGE
            self._table[slot, :len(pages)] = pages
            self._table_dirty = True
            for k, v in knob_arrays([r.sampling]).items():
                self._knobs[k][slot] = v[0]
            self._knobs_dev = None
            self._prefilling.append(r)

    def _sync(self) -> None:
        """Upload the host's page table and sampling settings if they changed."""
        if self._table_dirty:
            self.cache = self.cache.with_table(self._table)
            self._table_dirty = False
        if self._knobs_dev is None:
            self._knobs_dev = {k: global_array(v, self._replicated) for k, v in self._knobs.items()}

    def _prefill_chunk(self) -> bool:
        rows = self._prefilling[:self.prefill_rows]
        if not rows:
            return False
        n, c = self.prefill_rows, self.chunk
        tokens = np.zeros((n, c), np.int32)
        slots = np.full(n, self.max_batch, np.int32)  # padding rows name no slot
        q_start = np.zeros(n, np.int32)
        n_valid = np.zeros(n, np.int32)
        for i, r in enumerate(rows):
            part = r.prompt_ids[r._written:r._written + c]
            tokens[i, :len(part)] = part
            slots[i], q_start[i], n_valid[i] = r._slot, r._written, len(part)
            r._written += len(part)
        self._sync()
        with self._mesh():
            sampled, _, self.cache = prefill_step(self.graphdef, self.state, self.cache, tokens, slots, q_start,
                                                  n_valid, self._knobs_dev, impl=self.impl)
        done = [i for i, r in enumerate(rows) if r._written == len(r.prompt_ids)]
        if done:
            mask = np.zeros(n, bool)
            mask[done] = True
            self._tokens = put_rows(self._tokens, slots, sampled, mask)
            for i in done:
                r = rows[i]
                self._prefilling.remove(r)
                r._dispatched = 1
                self._active[r._slot] = self._may_continue(r)
            self._pending.append((sampled, [(i, rows[i]) for i in done]))
        return True

    def _may_continue(self, r: Request) -> bool:
        """Whether another decode step should be dispatched for r (host-side limits only)."""
        return r._dispatched < r.sampling.max_new_tokens and r._written < self.max_len and r.finish_reason is None

    def _decode(self) -> bool:
        slots = np.flatnonzero(self._active)
        if not len(slots):
            return False
        for s in slots:  # the token fed this step lands at position _written: make sure its page exists
            r = self._slots[s]
            if r._written // self.page_size >= len(r._pages):
                r._pages.append(self.pool.grow(self._shard(s)))
                r._reserve -= 1
                self._table[s, len(r._pages) - 1] = r._pages[-1]
                self._table_dirty = True
        self._sync()
        with self._mesh():
            self._tokens, _, self.cache = decode_step(self.graphdef, self.state, self.cache, self._tokens,
                                                      self._active.copy(), self._knobs_dev, impl=self.impl)
        batch = []
        for s in slots:
            r = self._slots[s]
            r._written += 1
            r._dispatched += 1
            batch.append((s, r))
            self._active[s] = self._may_continue(r)
        self._pending.append((self._tokens, batch))
        return True

    def _read(self, device_tokens, rows) -> None:
        """Hand dispatched tokens to their requests; finish the ones that stopped."""
        host = to_host(device_tokens)
        now = time.perf_counter()
        count = 0
        for i, r in rows:
            if r.finish_reason is not None:
                continue  # a step dispatched before the request stopped or was cancelled
            tok = int(host[i])
            r.tokens.append(tok)
            r.first_token_at = r.first_token_at or now
            count += 1
            if tok in r.sampling.stop_ids:
                reason = "stop"
            elif len(r.tokens) >= r.sampling.max_new_tokens or len(r.prompt_ids) + len(r.tokens) >= self.max_len:
                reason = "length"
            else:
                reason = None
            if r.on_event is not None:
                r.on_event(r, [tok], False)
            if reason:
                self._finish(r, reason)
        self.stats["generated_tokens"] += count
        self._recent.append((now, count))

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.finished_at = time.perf_counter()
        if r._slot is not None:
            slot = r._slot
            self._active[slot] = False
            if r in self._prefilling:
                self._prefilling.remove(r)
            self.pool.release(r._pages, r.prompt_ids + r.tokens, r._written, r._reserve, self._shard(slot))
            self._slots[slot] = None
            r._slot, r._pages, r._reserve = None, [], 0
        self.stats["finished"] += 1
        if r.on_event is not None:
            r.on_event(r, [], True)
        r.done.set()

    def _mesh(self):
        """The engine's mesh as the context mesh while tracing and running (the MoE lays out its
        shard_map from it)."""
        import contextlib

        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
