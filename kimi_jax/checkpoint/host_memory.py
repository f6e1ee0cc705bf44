"""Fresh host memory for the blocks the loader reads: aligned so that XLA:CPU adopts a block as the
device array itself (no second copy), and faulted in the cheapest way this machine offers.

Every byte a CPU load produces lands in memory nobody has touched yet, and Linux maps such memory
on first write. How much that costs depends on the page size and on the machine's state, and the
cheaper page size changes with that state. On our 2-core VM (Firecracker, with free page reporting:
the host takes back free 2 MiB blocks and faults them in again on reuse):
  * with plenty of backed free memory, 2 MiB transparent huge pages win: numpy's own allocator asks
    for them (madvise(MADV_HUGEPAGE) on arrays of 4 MiB and more) and wrote 6.38 GB in 1.18 s, while
    4 KiB pages faulted in by MAP_POPULATE took 4.02 s;
  * with the host's memory busy and freed blocks reported, huge pages are what the host took back,
    and the same write measured 3-4x slower on huge pages than on 4 KiB pages.
So large blocks are faulted in explicitly (MADV_POPULATE_WRITE), and the first `TRIAL_BYTES` of
each page size are spent measuring: ranges of the first blocks alternate between huge and 4 KiB
pages while the CPU time each costs per byte is measured (the faulting thread's own CPU time, so
other processes' load does not count). Everything after that goes on the cheaper kind. Blocks under
4 MiB stay on 4 KiB pages, where rounding each up to 2 MiB would cost more memory than their faults
cost time.
"""

from __future__ import annotations

import math
import mmap
import threading
import time

import numpy as np

HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 4 << 20  # numpy's threshold for the same advice
TRIAL_BYTES = 64 << 20  # of each page size, before the cheaper one is kept: 32 huge pages, 16,384 small ones
# XLA:CPU adopts a host buffer as a device array without copying it when it is this aligned.
XLA_CPU_ALIGNMENT = 64
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; Python does not export it


class PageSizeChooser:
    """Which page size the next range of a large block gets: alternate while measuring, then the
    cheaper one. Shared by the loader's threads."""

    KINDS = ("huge", "small")

    def __init__(self, trial_bytes: int = TRIAL_BYTES):
        self.trial_bytes = trial_bytes
        self.handed = dict.fromkeys(self.KINDS, 0)  # bytes given out for measuring, done or not
        self.bytes = dict.fromkeys(self.KINDS, 0)  # bytes measured
        self.seconds = dict.fromkeys(self.KINDS, 0.0)
        self._lock = threading.Lock()

    def next_range(self, remaining: int) -> tuple[str, int]:
        """(page size kind, bytes) for the next range of a block with `remaining` bytes to fault in:
        while a kind's trial is not handed out, a range of whole huge pages towards it; then all of
        the rest on the kind measured cheaper (while the other's trial is still running: the
        measured one)."""
        with self._lock:
            untried = [k for k in self.KINDS if self.handed[k] < self.trial_bytes]
            if untried:
                kind = min(untried, key=lambda k: self.handed[k])
                size = min(remaining, -(-(self.trial_bytes - self.handed[kind]) // HUGE_PAGE) * HUGE_PAGE)
                self.handed[kind] += size
                return kind, size
            return min(self.KINDS, key=self.seconds_per_byte), remaining

    def record(self, kind: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes[kind] += nbytes
            self.seconds[kind] += seconds

    def seconds_per_byte(self, kind: str) -> float:
        """Measured CPU seconds per byte of `kind` (infinite before its first measurement)."""
        return self.seconds[kind] / self.bytes[kind] if self.bytes[kind] else float("inf")


_CHOOSER = PageSizeChooser()


def new_host_array(shape, dtype, chooser: PageSizeChooser | None = None) -> np.ndarray:
    """An uninitialized array in fresh anonymous memory, page aligned; a large one already faulted
    in, on the page size `chooser` (default: the process's own) finds cheaper. The memory returns to
    the system when the array (or a device array adopting it) is dropped."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype, count).reshape(shape)
    chooser = chooser or _CHOOSER
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # Huge pages only cover whole aligned 2 MiB ranges: map one spare huge page and start at the
    # first boundary inside the mapping.
    buffer = mmap.mmap(-1, span + HUGE_PAGE, flags=flags)
    start = -np.frombuffer(buffer, np.uint8, 1).ctypes.data % HUGE_PAGE
    done = 0
    while done < span:
        kind, size = chooser.next_range(span - done)
        t0 = time.thread_time()
        buffer.madvise(mmap.MADV_HUGEPAGE if kind == "huge" else mmap.MADV_NOHUGEPAGE, start + done, size)
        _populate(buffer, start + done, size, HUGE_PAGE if kind == "huge" else mmap.PAGESIZE)
        chooser.record(kind, size, time.thread_time() - t0)
        done += size
    return np.frombuffer(buffer, dtype, count, start).reshape(shape)


def _populate(buffer: mmap.mmap, start: int, size: int, page: int) -> None:
    """Fault in [start, start + size) now, in one call where the kernel offers it."""
    try:
        buffer.madvise(_MADV_POPULATE_WRITE, start, size)
    except OSError:  # an older kernel: one write per page does the same, a fault at a time
        np.frombuffer(buffer, np.uint8, size, start)[::page] = 0
