"""The generation engine: requests of token ids in, token ids out, many requests at once over one
paged latent cache.

    engine = BatchEngine(model, max_batch=8, max_len=4096)
    req = engine.submit(prompt_ids, SamplingParams(...), on_event)   # from any thread
    engine.start()        # a background thread steps while there is work ... or, synchronously:
    engine.wait([req])    # steps in this thread when no background thread runs
    engine.generate([prompt_ids, ...], sampling)                        # -> finished Requests

The policy (admission, prefix pages, chunks, packing, block lengths, stopping) is scheduler.py,
plain Python; this file gives it a `JaxDevice` that runs the compiled programs of steps.py, and
adds the threads, the queue and several-host mirroring around it. The engine sees token ids only;
stop strings, chat formatting and tool calls live above it.

Several hosts. Every process runs the same scheduler on the same inputs, so their decisions agree
and each host drives its own devices through the same compiled steps. Either every process submits
the same requests itself (the CLI), or, with `mirror=True` (the server), only process 0 takes
requests: at the start of each iteration it sends the new ones and the cancellations to the others,
which run `follow()` until process 0 stops.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from kernels_pallas.backends import backend_for
from kimi_jax.cache import PagedCache, default_pool_pages
from kimi_jax.distributed import broadcast_from_main, global_array, is_main, to_host
from kimi_jax.errors import KimiError
from kimi_jax.model import KimiK2
from kimi_jax.pages import PagePool, pages_for
from kimi_jax.sampling import SamplingParams
from kimi_jax.scheduler import (
    DEFAULT_CHUNK,
    DEFAULT_DECODE_BLOCK,
    DecodeWork,
    PrefillWork,
    QueueFull,
    Request,
    Scheduler,
    VerifyWork,
)
from kimi_jax.sharding import platform_of
from kimi_jax.speculation import DEFAULT_DRAFT_TOKENS, FixedCosts, Speculator, check_settings
from kimi_jax.steps import SlotState, decode_steps, prefill_step, resume_slots, split_model, verify_step

__all__ = ["BatchEngine", "JaxDevice", "QueueFull", "Request", "DEFAULT_CHUNK", "DEFAULT_DECODE_BLOCK"]


class JaxDevice:
    """The scheduler's device: the compiled steps over the cache and the per-slot decode state,
    with the model's weights as a flat list (steps.split_model). Host arrays are uploaded only when
    they change: the page table and knobs when the scheduler says so, the packed rows when the set
    of active slots changes."""

    def __init__(self, model: KimiK2, cache: PagedCache, *, mesh: Mesh | None, impl: str, max_steps: int):
        self.model_def, self.weights = split_model(model)
        self.max_steps = max_steps
        self.vocab_size = model.cfg.vocab_size
        self.cache, self.mesh, self.impl = cache, mesh, impl
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh else \
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.state = SlotState.create(cache.slots, self.replicated)
        self.knobs = None
        self._rows = (None, None)  # (host rows, device rows) of the last decode dispatch
        self._counts = {}  # step count -> the device scalar, uploaded once

    def _put(self, value: np.ndarray):
        return global_array(value, self.replicated)

    def set_table(self, table: np.ndarray) -> None:
        self.cache = self.cache.with_table(table)

    def set_knobs(self, knobs: dict) -> None:
        self.knobs = {k: self._put(v) for k, v in knobs.items()}

    def _context(self):
        """The engine's mesh as the context mesh while tracing (the MoE and attention lay out their
        shard_maps from it). Entered only around dispatches of a sharded engine."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def prefill(self, work: PrefillWork):
        mask = None if work.mask is None else self._put(work.mask)
        with self._context():
            sampled, _, self.cache, self.state = prefill_step(
                self.model_def, self.weights, self.cache, self.state, work.tokens, work.slots, work.q_start,
                work.n_valid, work.finish_budget, self.knobs, mask, impl=self.impl)
        return sampled

    def decode(self, work: DecodeWork):
        host_rows, rows = self._rows
        if host_rows is None or not np.array_equal(host_rows, work.rows):
            rows = self._put(work.rows)
            self._rows = (work.rows, rows)
        if work.steps not in self._counts:
            self._counts[work.steps] = self._put(np.int32(work.steps))
        mask = None if work.mask is None else self._put(work.mask)
        with self._context():
            tokens, _, self.cache, self.state = decode_steps(
                self.model_def, self.weights, self.cache, self.state, rows, self._counts[work.steps], self.knobs, mask,
                max_steps=self.max_steps, impl=self.impl)
        return tokens

    def verify(self, work: VerifyWork):
        with self._context():
            tokens, self.cache, self.state = verify_step(
                self.model_def, self.weights, self.cache, self.state, self._put(work.rows), self._put(work.drafts),
                self._put(work.n_draft), self.knobs, impl=self.impl)
        return tokens

    def resume(self, slots: list[int]) -> None:
        self.state = resume_slots(self.state, self._put(np.asarray(slots, np.int32)))

    def read(self, handle) -> np.ndarray:
        return to_host(handle)


class BatchEngine:
    """Runs requests of token ids through a model with continuous batching over a paged cache
    (see the module doc); `generate` for a batch, `submit`/`wait`/`start` for a stream."""

    def __init__(self, model: KimiK2, *, max_batch: int = 8, max_len: int = 4096, chunk: int = DEFAULT_CHUNK,
                 page_size: int | None = None, n_pages: int | None = None, prefill_rows: int = 1,
                 max_queue: int = 64, mesh: Mesh | None = None, impl: str | None = None, mirror: bool = False,
                 decode_block: int = DEFAULT_DECODE_BLOCK, speculate: str = "off",
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        """`impl`: the kernels (kernels_pallas.ops IMPLS); default: the best for the mesh's devices.
        `page_size`: tokens per cache page (default: what the devices read best, the backend record).
        `n_pages`: the page pool (default: cache.default_pool_pages). `decode_block`: the most
        decode steps one dispatch runs (1: a dispatch per token). `speculate`: draft tokens from
        each request's own tokens ("ngram") and also from recent outputs ("suffix"), up to
        `draft_tokens` per step, and verify them when that makes more tokens per second
        (speculation.py); "off": never. `mirror`: process 0's requests are replayed on every other
        process (several hosts)."""
        if max_batch < 1 or chunk < 1 or prefill_rows < 1:
            raise KimiError("max_batch, chunk and prefill_rows must be >= 1")
        if decode_block < 1:
            raise KimiError(f"decode_block (steps per dispatch) must be >= 1, got {decode_block}")
        check_settings(speculate, draft_tokens)
        data = mesh.shape["data"] if mesh is not None else 1
        if max_batch % data:
            raise KimiError(f"max_batch {max_batch} must be a multiple of the mesh's data axis ({data})")
        self.cfg = model.cfg
        self.max_batch, self.max_len, self.chunk, self.max_queue = max_batch, max_len, chunk, max_queue
        self.mesh = mesh
        platform = platform_of(mesh)
        backend = backend_for(platform)
        self.impl = impl or backend.impl
        self.page_size = page_size or backend.page_size
        n_pages = n_pages or default_pool_pages(max_batch, max_len, self.page_size, data)
        self.pool = PagePool(n_pages, self.page_size, shards=data)
        if self.pool.capacity < pages_for(max_len, self.page_size):
            raise KimiError(f"a cache of {n_pages} pages of {self.page_size} tokens cannot hold one request of "
                            f"max_len {max_len} tokens" + (f" per data shard ({data})" if data > 1 else ""))
        cache = PagedCache.create(self.cfg, slots=max_batch, max_len=max_len, page_size=self.page_size,
                                  n_pages=n_pages, dtype=model.dtype, mesh=mesh, page_order=backend.page_order,
                                  words=backend.cache_words)
        self.device = JaxDevice(model, cache, mesh=mesh, impl=self.impl, max_steps=decode_block)
        # Several processes must make the same choices without sharing clocks: a fixed cost then,
        # that of two decode steps (a K2 verify step's bytes with a few drafts per row, BENCHMARKS.md),
        # so only drafts that are mostly accepted get verified.
        speculator = None if speculate == "off" else Speculator(
            speculate, draft_tokens, costs=FixedCosts(2.0) if jax.process_count() > 1 else None)
        self.speculate = speculate
        self.scheduler = Scheduler(self.device, max_batch=max_batch, max_len=max_len, chunk=chunk, pool=self.pool,
                                   prefill_rows=prefill_rows, decode_block=decode_block, speculator=speculator)
        self._inbox: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self.mirror = mirror and jax.process_count() > 1
        self._stopped = False

    # ---- public API -----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, on_event: Callable | None = None,
               constraint: object | None = None) -> Request:
        """Queue a request (thread-safe). `on_event(request, new_tokens, finished)` is called from the
        engine's thread whenever the request got tokens, and once with finished=True at its end.
        `constraint`: restricts the tokens (mask()/accept()/breaks; see scheduler.py)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise KimiError("empty prompt: give at least one token")
        if len(prompt) >= self.max_len:
            raise KimiError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens "
                            "(one token must be left to generate)")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise KimiError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if constraint is not None and self.mirror:
            raise KimiError("constrained decoding is not supported when serving from several hosts")
        request = Request(prompt, sampling, on_event, constraint)
        with self._lock:
            if len(self.scheduler.waiting) + len(self._inbox) >= self.max_queue:
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
                while self._running and not self._inbox and not self.scheduler.busy():
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

    def warm_up(self, masks: bool = False) -> None:
        """Compile every program the engine may run before the first request needs it: the
        prefill chunk and, for each row bucket, the decode block (with `masks`, also that of
        constrained rows) and, speculating, the verify step of each draft width. Each runs once on nothing
        (padding rows, zero steps), so no slot changes; with the compilation cache on, later
        processes load them from disk."""
        with self._step_lock:
            self.scheduler.warm_up(masks)

    def metrics(self) -> dict:
        """A snapshot of load and throughput: slots, queue, pages, prefix-cache hits, token counts
        and the generation rate over the last 10 seconds."""
        s = self.scheduler
        now = time.perf_counter()
        window = [(t, n) for t, n in s.recent if now - t < 10.0]
        rate = sum(n for _, n in window) / (now - window[0][0]) if len(window) > 1 else 0.0
        prompt = s.stats["prompt_tokens"]
        return {
            "slots_busy": sum(r is not None for r in s.slots), "slots_total": self.max_batch,
            "queue_len": len(s.waiting) + len(self._inbox),
            "pages_used": self.pool.used(), "pages_cached": self.pool.cached(),
            "pages_total": self.pool.capacity * self.pool.shards, "page_size": self.page_size,
            "prefix_cache_hit_rate": s.stats["cached_tokens"] / prompt if prompt else 0.0,
            "prompt_tokens": prompt, "cached_tokens": s.stats["cached_tokens"],
            "generated_tokens": s.stats["generated_tokens"], "requests_finished": s.stats["finished"],
            "tokens_per_second": rate,
            **self.speculation_metrics(),
        }

    def speculation_metrics(self) -> dict:
        """Draft tokens proposed and accepted, verify steps, and the tokens a verify step made per
        request on average (all zero with speculation off)."""
        spec = self.scheduler.spec
        stats = spec.stats if spec is not None else dict.fromkeys(
            ("drafted_tokens", "accepted_tokens", "verify_steps", "verify_rows", "verify_tokens"), 0)
        rows = stats["verify_rows"]
        return {"draft_tokens": stats["drafted_tokens"], "draft_tokens_accepted": stats["accepted_tokens"],
                "verify_steps": stats["verify_steps"],
                "tokens_per_verify_row": stats["verify_tokens"] / rows if rows else 0.0}

    # ---- one iteration --------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduler iteration (scheduler.Scheduler.step). Returns whether any work remains."""
        with self._step_lock:
            with self._lock:
                new, self._inbox = self._inbox, []
            if self.mirror:
                new = self._mirror(new)
                if new is None:
                    return False
            self.scheduler.waiting.extend(new)
            return self.scheduler.step()

    def _mirror(self, new: list[Request]) -> list[Request] | None:
        """Process 0's new requests and cancellations, on every process. None: process 0 stopped."""
        s = self.scheduler
        live = [r for r in [*s.slots, *s.waiting, *new] if r is not None]
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
