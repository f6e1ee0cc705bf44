"""Loading a Hugging Face K2 checkpoint directory onto devices, on a pool of threads.

Loading checks the whole checkpoint first (validation.py): every expected tensor's presence, dtype
and shape, before anything is allocated. Then every parameter is built from the blocks its devices
hold: each distinct block is read once, from the file straight into fresh host memory
(host_memory.py), and put on the devices that hold it; a parameter sharded across devices is read
only in the slices this process's devices hold. On CPU that host block becomes the device array
itself (XLA adopts aligned host buffers), so the bytes are copied exactly once, like `cat`; on an
accelerator the block is the source of the host-to-device copy and is dropped once that is done.
Routed experts in compressed-tensors `pack-quantized` form stay packed (int32 words + scales) and
are repacked on the devices where their kernels read another packing (expert_repacking.py).

Parameters load on a pool of threads (the copies release the GIL), and a byte budget bounds the
host memory held by blocks not yet on their devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kernels_pallas.backends import backend_for
from kimi_jax.checkpoint.expert_repacking import repack_experts
from kimi_jax.checkpoint.host_memory import new_host_array
from kimi_jax.checkpoint.reader import CheckpointReader
from kimi_jax.checkpoint.tensor_table import TensorEntry, tensor_table
from kimi_jax.checkpoint.validation import validate
from kimi_jax.config import Config
from kimi_jax.model import abstract_model, expert_packing_for
from kimi_jax.quant import Int4Weight
from kimi_jax.sharding import DEFAULT_RULES, param_axes, platform_of, sharding_for


def convert_on_host(platform: str, stored: np.dtype, dtype: np.dtype) -> bool:
    """Whether a stored tensor is converted to the parameter's dtype on the host, during the one
    copy out of the file, rather than on the device after the transfer. On CPU the host is the
    device, and the copy converts for free; elsewhere the conversion happens on whichever side
    makes the bytes that cross to the device fewer. (Same dtypes: nothing to convert.)"""
    return platform == "cpu" or dtype.itemsize <= stored.itemsize


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One array to build: a parameter, or the packed words or scales of an INT4 parameter."""

    entry: TensorEntry
    shape: tuple[int, ...]
    sharding: jax.sharding.Sharding
    stored: np.dtype  # dtype in the files
    dtype: np.dtype  # dtype of the parameter

    @property
    def host_dtype(self) -> np.dtype:
        """The dtype the block is copied out as (see `convert_on_host`)."""
        platform = next(iter(self.sharding.device_set)).platform
        return self.dtype if convert_on_host(platform, self.stored, self.dtype) else self.stored

    def blocks(self) -> list[tuple[tuple, list]]:
        """(index, devices) for each distinct block this process's devices hold."""
        out: dict[tuple, tuple[tuple, list]] = {}
        for device, index in self.sharding.addressable_devices_indices_map(self.shape).items():
            key = tuple(s.indices(n) for s, n in zip(index, self.shape))
            out.setdefault(key, (index, []))[1].append(device)
        return list(out.values())

    def host_bytes(self) -> int:
        return len(self.blocks()) * math.prod(self.sharding.shard_shape(self.shape)) * self.host_dtype.itemsize


class _ByteBudget:
    """At most `limit` bytes of host blocks in flight; a block larger than that waits to go alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _read_block(reader: CheckpointReader, entry: TensorEntry, index: tuple, out: np.ndarray) -> None:
    """Fill `out` with block `index` of the parameter. A routed-expert parameter's first axis picks
    expert tensors, so a device holding some experts reads only theirs."""
    if not entry.experts:
        reader.copy_into(entry.hf[0], out, lambda t: entry.to_param(t)[index])
        return
    for k, name in enumerate(entry.hf[index[0]]):
        reader.copy_into(name, out[k], lambda t: entry.to_param(t)[index[1:]])


def _load_leaf(reader: CheckpointReader, leaf: _Leaf, budget: _ByteBudget) -> jax.Array:
    host_dtype = leaf.host_dtype
    block_shape = leaf.sharding.shard_shape(leaf.shape)
    placed = {}
    for index, devices in leaf.blocks():
        with budget.hold(math.prod(block_shape) * host_dtype.itemsize):
            block = new_host_array(block_shape, host_dtype)
            _read_block(reader, leaf.entry, index, block)
            arrays = [jax.device_put(block, device) for device in devices]
            del block  # the devices own the bytes (or are copying them) now
            jax.block_until_ready(arrays)  # only then is the host block freed and its budget returned
        placed.update(zip(devices, arrays))
    devices = leaf.sharding.addressable_devices_indices_map(leaf.shape)
    array = jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, [placed[d] for d in devices])
    return array if host_dtype == leaf.dtype else array.astype(leaf.dtype)


@dataclasses.dataclass(frozen=True)
class _Param:
    path: tuple
    var: nnx.Variable
    leaves: dict[str | None, _Leaf]  # {None: array} or {'packed': ..., 'scale': ...}
    in_features: int | None  # of an INT4 parameter

    def host_bytes(self) -> int:
        return sum(leaf.host_bytes() for leaf in self.leaves.values())


def _plan(reader: CheckpointReader, cfg: Config, flat, mesh, rules) -> list[_Param]:
    """What to build for every parameter; all shardings are checked here, before any read."""
    by_leaf = {(entry.path, entry.leaf): entry for entry in tensor_table(cfg)}
    plan = []
    for path, var in flat:
        value = var.get_value()
        int4 = isinstance(value, Int4Weight)
        leaves = {}
        for leaf, abs_arr in ({"packed": value.packed, "scale": value.scale} if int4 else {None: value}).items():
            entry = by_leaf.get((path, leaf))
            if entry is None:
                raise AssertionError(f"no checkpoint entry for parameter {'/'.join(map(str, path))}")
            stored = reader.info(entry.hf[0]).np_dtype
            # The router bias stays float32; INT4 scales keep their stored dtype, so dequantization
            # rounds like compressed-tensors.
            dtype = np.dtype(np.float32) if entry.f32 else stored if leaf == "scale" else np.dtype(abs_arr.dtype)
            sharding = sharding_for(param_axes(var), abs_arr.shape, mesh, rules, name="/".join(map(str, path)))
            leaves[leaf] = _Leaf(entry, abs_arr.shape, sharding, stored, dtype)
        plan.append(_Param(path, var, leaves, value.in_features if int4 else None))
    return plan


def load_state(directory, cfg: Config, *, dtype=jnp.bfloat16, mesh=None, rules=DEFAULT_RULES,
               progress: bool = True, transform: Callable | None = None, workers: int | None = None,
               expert_packing: str | None = None):
    """(graphdef, state) of a `KimiK2` of `cfg` (the directory's config.json, read by the caller)
    with the checkpoint's weights, placed per the mesh rules.

    INT4 routed experts are read in the checkpoint's packing and repacked into `expert_packing`
    (default: what the devices' kernels read, kernels_pallas.backends) as they are loaded.

    `transform(path, value)`, if given, is applied to each parameter once it is on its devices, in
    its final sharding and packing, and its result is kept instead, made on the device one
    parameter at a time so memory stays bounded. `value` is a jax.Array or, for INT4 routed
    experts, an `Int4Weight`. `workers` threads read in parallel (default: the CPU count, at most 8)."""
    expert_packing = expert_packing or expert_packing_for(cfg, backend_for(platform_of(mesh)))
    with CheckpointReader(directory) as reader:
        validate(reader, cfg)
        graphdef, state = abstract_model(cfg, dtype, expert_packing=expert_packing)
        flat = nnx.to_flat_state(state)
        stored = flat if expert_packing == "ct" else nnx.to_flat_state(abstract_model(cfg, dtype)[1])
        plan = _plan(reader, cfg, stored, mesh, rules)
        targets = dict(flat)
        repack = repack_experts(state, mesh, rules)
        # Host blocks in flight stay within the largest tensor the model reads, so peak host memory
        # beyond the loaded weights (those blocks, and the file pages of a strided copy) is at most
        # twice that tensor.
        budget = _ByteBudget(max(reader.info(name).nbytes for p in plan for leaf in p.leaves.values()
                                 for name in leaf.entry.hf))

        def load(p: _Param):
            arrays = {name: _load_leaf(reader, leaf, budget) for name, leaf in p.leaves.items()}
            value = arrays[None] if p.in_features is None else \
                repack(p.path, Int4Weight(arrays["packed"], arrays["scale"], p.in_features))
            return value if transform is None else transform(p.path, value)

        bar = tqdm(total=sum(p.host_bytes() for p in plan), desc="loading", unit="B", unit_scale=True,
                   unit_divisor=1024, disable=not progress, leave=False)
        pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1), thread_name_prefix="kimi-load")
        try:
            futures = {pool.submit(load, p): p for p in plan}
            for future in as_completed(futures):
                p = futures[future]
                targets[p.path].set_value(future.result())
                bar.update(p.host_bytes())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    return graphdef, nnx.from_flat_state(flat)


def load_model(directory, *, dtype=jnp.bfloat16, mesh=None, rules=DEFAULT_RULES, progress: bool = True,
               transform: Callable | None = None, workers: int | None = None, expert_packing: str | None = None):
    """Load a HF-layout K2 checkpoint directory: returns (model, config). See `load_state`."""
    cfg = Config.from_hf(directory)
    graphdef, state = load_state(directory, cfg, dtype=dtype, mesh=mesh, rules=rules, progress=progress,
                                 transform=transform, workers=workers, expert_packing=expert_packing)
    return nnx.merge(graphdef, state), cfg
