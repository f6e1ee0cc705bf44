"""One safetensors file, read without the safetensors library: its header, and blocks copied out.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw row-major data. Loading a checkpoint at the speed the
files can be read needs what the library does not offer: copying an arbitrary slice of a tensor
straight from the memory-mapped file into a buffer the caller owns (the buffer then becomes a
device array, on CPU without another copy), with the GIL released while bytes move. So this module
parses the header itself and hands out zero-copy views of the mapped bytes, one tensor at a time.

A copy reads contiguous bytes with pread, and maps (only) the one tensor it reads for the rest,
unmapping it afterwards, so the process never keeps the checkpoint's page cache mapped: its
resident memory is what it loaded plus the tensors being copied at that moment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from typing import Callable

import ml_dtypes
import numpy as np

from kimi_jax.errors import CheckpointError

DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
# A header this large is certainly not one: K2's biggest shard header is a few hundred kilobytes.
MAX_HEADER_BYTES = 100 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str  # as the header spells it: 'BF16', 'I32', ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets of the data in the file
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """The header of one .safetensors file, checked against the file's size, and copy-out of blocks."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        try:
            self.tensors = self._read_header()
        except Exception:
            os.close(self._fd)
            raise

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a readable safetensors file, truncated or corrupt ({why})")

    def _read_header(self) -> dict[str, TensorInfo]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise self._corrupt(f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        header.pop("__metadata__", None)
        tensors = {}
        for name, meta in header.items():
            try:
                dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
                ok = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)) and begin <= end
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise self._corrupt(f"bad header entry for tensor '{name}': {meta!r:.200}")
            if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
                raise self._corrupt(f"tensor '{name}' spans {end - begin} bytes, but {dtype} {list(shape)} "
                                    f"needs {math.prod(shape) * DTYPES[dtype].itemsize}")
            if 8 + n + end > size:
                raise self._corrupt(f"tensor '{name}' ends at byte {8 + n + end}, past the end of the "
                                    f"{size}-byte file")
            tensors[name] = TensorInfo(dtype, shape, 8 + n + begin, 8 + n + end)
        return tensors

    def copy_into(self, name: str, out: np.ndarray, select: Callable[[np.ndarray], np.ndarray] | None = None):
        """Copy `select(tensor)` into `out`, converting to `out`'s dtype if it differs.

        `tensor` is a read-only view of the mapped bytes and `select` must return a view of it
        (reshape, slicing): only the pages that view touches are read. When that view is one
        contiguous run of bytes in `out`'s dtype (a whole tensor, or a block of leading rows), the
        bytes are read straight into `out` with pread, as `cat` reads them: the kernel copies from
        the page cache, with no page faults on a mapping of the file. Other views are copied from
        the mapping by numpy. Both release the GIL, so threads copying different tensors run in
        parallel."""
        info = self.tensors[name]
        if info.end == info.start:
            return  # an empty tensor: `out` is empty too
        # mmap offsets must be page aligned: map from the page holding the tensor's first byte.
        # Mapping touches nothing: it only lets numpy work out which bytes the view holds.
        base = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, info.end - base, access=mmap.ACCESS_READ, offset=base)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e.strerror})") from None
        except ValueError:  # Python's own check that the mapping lies inside the file
            raise self._cut_short(name) from None
        tensor = view = None
        try:
            tensor = np.frombuffer(mapped, info.np_dtype, math.prod(info.shape), info.start - base)
            tensor = tensor.reshape(info.shape)
            view = tensor if select is None else select(tensor)
            if view.dtype == out.dtype and view.shape == out.shape and view.flags.c_contiguous \
                    and out.flags.c_contiguous:
                skipped = view.__array_interface__["data"][0] - tensor.__array_interface__["data"][0]
                self._pread_into(out, info.start + skipped, name)
            else:
                np.copyto(out, view, casting="same_kind")
        finally:
            del tensor, view  # the mapping cannot close while a view of it is alive
            mapped.close()

    def _pread_into(self, out: np.ndarray, offset: int, name: str) -> None:
        """Fill `out` with the file's bytes from `offset` on; a read returns at most ~2 GiB on Linux."""
        buffer, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < len(buffer):
            n = os.preadv(self._fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise self._cut_short(name)
            done += n

    def _cut_short(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: the file ends before tensor '{name}' does (truncated after it was "
                               "opened?)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
