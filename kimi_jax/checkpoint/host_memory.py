"""Fresh host memory for the blocks the loader reads: aligned so that XLA:CPU adopts a block as the
device array itself (no second copy), and backed by huge pages when it is large.

Why huge pages: every byte a CPU load produces lands in memory nobody has touched yet, and Linux
maps such memory on first write, one page fault per page. With 4 KiB pages a 6.4 GB load takes
1.6 million faults, which on our 2-core VM cost several times the copy itself; with 2 MiB
transparent huge pages it takes 3,000. Where THP is in "madvise" mode (the usual default), memory
gets huge pages only when asked for them with madvise(MADV_HUGEPAGE). numpy asks for every array of
4 MiB or more, so `np.empty(n).fill(1)` already runs at the huge-page rate; a plain anonymous mmap
does not ask, and writing into it measured 3x slower than numpy on the same machine. So blocks of
4 MiB or more are mapped at a 2 MiB boundary and advised; smaller ones stay on ordinary pages,
where rounding each up to 2 MiB would cost more memory than their faults cost time.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 4 << 20  # numpy's threshold for the same advice
# XLA:CPU adopts a host buffer as a device array without copying it when it is this aligned.
XLA_CPU_ALIGNMENT = 64


def new_host_array(shape, dtype) -> np.ndarray:
    """An uninitialized array in fresh anonymous memory: page aligned, on huge pages when it is
    large enough and the platform offers them (see the module docstring). The memory is returned
    to the system when the array (or a device array adopting it) is dropped."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype, count).reshape(shape)
    # Huge pages only cover whole aligned 2 MiB ranges: map one spare huge page and start at the
    # first boundary inside the mapping.
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    buffer = mmap.mmap(-1, span + HUGE_PAGE, flags=flags)
    start = -np.frombuffer(buffer, np.uint8, 1).ctypes.data % HUGE_PAGE
    buffer.madvise(mmap.MADV_HUGEPAGE, start, span)
    return np.frombuffer(buffer, dtype, count, start).reshape(shape)
