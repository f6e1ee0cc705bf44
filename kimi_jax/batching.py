# TEMPORARY stand-in for the continuous-batching engine: the lead replaces this whole file.
"""The BatchEngine interface the server is written against, over the static `kimi_jax.engine.Engine`.

This stand-in runs one request at a time on a worker thread (one slot, no paged cache, no prefix
cache: `cached_tokens` is always 0). Queueing, the queue bound, cancellation between tokens and the
event callbacks behave as the real engine's do, so the server and its tests hold for both.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from typing import Callable, Sequence

from kimi_jax.engine import Engine
from kimi_jax.errors import KimiError
from kimi_jax.sampling import SamplingParams

# How far back tokens_per_second looks.
_RATE_WINDOW_S = 10.0


class QueueFull(KimiError):
    """The engine cannot accept more work now (the server answers 429)."""


class Request:
    """One submitted generation; created by `BatchEngine.submit`."""

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, on_event):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self._on_event = on_event
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()


class BatchEngine:
    def __init__(self, model, *, max_batch: int = 8, max_len: int = 4096, chunk: int = 128, page_size: int = 64,
                 n_pages: int | None = None, max_queue: int = 64, mesh=None):
        pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
        self.engine = Engine(model, max_len=max_len, chunk=chunk, pad_id=pad, mesh=mesh)
        self.max_batch = max_batch
        self.max_len = max_len
        self.page_size = page_size
        self.max_queue = max_queue
        self._queue: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._current: Request | None = None
        self._generation = None
        self._steps = None
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._running = False
        self._totals = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # ---- submitting -----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams,
               on_event: Callable | None = None) -> Request:
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise KimiError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.max_len:
            raise KimiError(f"prompt has {len(prompt_ids)} tokens but a request may use at most {self.max_len} "
                            "(prompt and completion)")
        with self._wake:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests; try again later")
            request = Request(f"req-{next(self._ids)}", prompt_ids, sampling, on_event)
            self._queue.append(request)
            self._wake.notify()
        return request

    # ---- running --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self):
        while True:
            with self._wake:
                while self._running and not self._queue and self._current is None:
                    self._wake.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception:  # keep serving the queue; the failed request ends as cancelled
                traceback.print_exc()
                request, self._current, self._generation, self._steps = self._current, None, None, None
                if request is not None:
                    self._finish(request, "cancelled")

    def step(self) -> bool:
        """Start the next request (its prefill) or decode one token of the current one."""
        if self._current is None:
            with self._wake:
                if not self._queue:
                    return False
                request = self._queue.popleft()
            if request._cancelled.is_set():
                self._finish(request, "cancelled")
                return True
            self._current = request
            self._generation = self.engine.generate([request.prompt_ids], request.sampling)
            self._steps = iter(self._generation)
            self._totals["prompt_tokens"] += len(request.prompt_ids)
            return True
        request, gen = self._current, self._generation
        new: list[int] = []
        if request._cancelled.is_set():
            gen.stop("cancelled")
        else:
            next(self._steps, None)
            new = gen.tokens[0][len(request.tokens):]
            request.tokens.extend(new)
            self._count(len(new))
        if not gen.done:
            if new:
                self._deliver(request, new, False)
            return True
        self._current = self._generation = self._steps = None
        self._finish(request, gen.finish_reasons[0], new)
        return True

    def _finish(self, request: Request, reason: str, new: list[int] = ()):
        """The last tokens (if any) and finished=True go out in one event, exactly once."""
        request.finish_reason = reason
        self._deliver(request, list(new), True)

    def _deliver(self, request: Request, new: list[int], finished: bool):
        if request._on_event is None:
            return
        try:
            request._on_event(request, new, finished)
        except Exception:  # a listener's bug must not stop the engine for every other request
            traceback.print_exc()

    def _count(self, n: int):
        now = time.monotonic()
        self._totals["generated_tokens"] += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()

    # ---- observing ------------------------------------------------------------------------------
    def metrics(self) -> dict:
        now = time.monotonic()
        recent = sum(n for t, n in self._recent if t >= now - _RATE_WINDOW_S)
        pages_total = -(-self.max_len // self.page_size)
        current, gen = self._current, self._generation
        used = -(-(len(current.prompt_ids) + len(current.tokens)) // self.page_size) if current and gen else 0
        return {
            "slots_busy": int(current is not None),
            "slots_total": 1,  # this stand-in serves one request at a time
            "queue_len": len(self._queue),
            "pages_used": used,
            "pages_total": pages_total,
            "prefix_cache_hit_rate": 0.0,
            **self._totals,
            "tokens_per_second": recent / _RATE_WINDOW_S,
        }
