"""Hugging Face checkpoint directories: the tensor-name table, validation, and loading.

One table (`layout`) says, for every parameter of `KimiK2`, which official tensor(s) hold it, their
shape, and how a stored tensor becomes the parameter: the model keeps the checkpoint's [out, in]
orientation, so that is at most a reshape (heads split out) or a view (the halves of kv_b_proj). The loader, the
checkpoint writer (export.py) and the test fixtures all read that table, so the three cannot drift.

Loading reads every shard's header first and checks each expected tensor's presence, dtype and
shape — nothing is allocated until the whole checkpoint is known to be good. Then each device's
block of each parameter is copied once, straight from the memory-mapped file into the buffer that
becomes the device array (see "loading" below); a parameter sharded across devices is read only
in the slices this process's devices hold. Routed experts in compressed-tensors `pack-quantized`
form stay packed (int32 words + scales).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kimi_jax.config import Config
from kimi_jax.errors import CheckpointError, KimiError
from kimi_jax.model import KimiK2, abstract_model, expert_layout_for
from kimi_jax.quant import Int4Weight
from kimi_jax.safetensors_file import SafetensorsFile, TensorInfo
from kimi_jax.sharding import DEFAULT_RULES, param_axes, platform_of, sharding_for

FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I32", "I64")


# ---- the layout table ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """One model parameter (or one leaf of an INT4 parameter) and the checkpoint tensor(s) behind it.

    Parameters are stored as the checkpoint stores them ([out, in]); `to_param` only reshapes (heads
    split out) or takes a view (the halves of kv_b_proj), and `to_hf` undoes it. A routed-expert
    parameter stacks its layer's experts along a leading axis: `hf` then lists one tensor per
    expert."""

    path: tuple  # parameter path in the model state
    leaf: str | None  # None, or 'packed'/'scale' for Int4Weight parameters
    hf: tuple[str, ...]  # one tensor name, or one per routed expert
    hf_shape: tuple[int, ...]  # stored shape of each of those tensors
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray] | None  # None: written together with a sibling (kv_b_proj)
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    f32: bool = False  # kept in float32 whatever the model dtype (router bias)
    experts: bool = False  # a routed-expert parameter: hf[e] is expert e's tensor


def _same(w):
    return w


def layout(cfg: Config) -> list[Entry]:
    d, v, h = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    n, p, vd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    f, n_exp = cfg.moe_intermediate_size, cfg.n_routed_experts

    def one(path, name, shape, to_param=_same, to_hf=_same, **kw):
        return Entry(path, None, (name,), shape, to_param, to_hf, **kw)

    def split_heads(width, k_in):  # [h*width, k_in] <-> [h, width, k_in]: a reshape, no copy
        return (lambda w: w.reshape(h, width, k_in)), (lambda x: x.reshape(h * width, k_in))

    out = [
        one(("embed",), "model.embed_tokens.weight", (v, d)),
        one(("norm",), "model.norm.weight", (d,)),
        one(("lm_head",), "lm_head.weight", (v, d)),
    ]
    for i in range(cfg.num_hidden_layers):
        pre, at = f"model.layers.{i}.", ("layers", i)
        kv_b = pre + "self_attn.kv_b_proj.weight"
        out += [
            one((*at, "input_norm"), pre + "input_layernorm.weight", (d,)),
            one((*at, "post_attention_norm"), pre + "post_attention_layernorm.weight", (d,)),
            one((*at, "attn", "kv_a_proj"), pre + "self_attn.kv_a_proj_with_mqa.weight", (r + p, d)),
            one((*at, "attn", "kv_a_norm"), pre + "self_attn.kv_a_layernorm.weight", (r,)),
            # kv_b_proj [h*(n+v), r] backs two parameters, its key and value halves per head;
            # iter_hf_tensors joins them back.
            one((*at, "attn", "k_b_proj"), kv_b, (h * (n + vd), r), lambda w: w.reshape(h, n + vd, r)[:, :n], None),
            one((*at, "attn", "v_b_proj"), kv_b, (h * (n + vd), r), lambda w: w.reshape(h, n + vd, r)[:, n:], None),
            one((*at, "attn", "o_proj"), pre + "self_attn.o_proj.weight", (d, h * vd),
                lambda w: w.reshape(d, h, vd), lambda x: x.reshape(d, h * vd)),
        ]
        if cfg.q_lora_rank is None:
            out.append(one((*at, "attn", "q_proj"), pre + "self_attn.q_proj.weight", (h * (n + p), d),
                           *split_heads(n + p, d)))
        else:
            q = cfg.q_lora_rank
            out += [
                one((*at, "attn", "q_a_proj"), pre + "self_attn.q_a_proj.weight", (q, d)),
                one((*at, "attn", "q_a_norm"), pre + "self_attn.q_a_layernorm.weight", (q,)),
                one((*at, "attn", "q_b_proj"), pre + "self_attn.q_b_proj.weight", (h * (n + p), q),
                    *split_heads(n + p, q)),
            ]
        if i < cfg.first_k_dense_replace:
            out += _mlp(at + ("mlp",), pre + "mlp.", d, cfg.intermediate_size)
            continue
        out += [
            one((*at, "mlp", "router"), pre + "mlp.gate.weight", (n_exp, d)),
            one((*at, "mlp", "router_bias"), pre + "mlp.gate.e_score_correction_bias", (n_exp,), f32=True),
        ]
        if cfg.n_shared_experts:
            out += _mlp(at + ("mlp", "shared"), pre + "mlp.shared_experts.", d, f * cfg.n_shared_experts)
        for proj, (out_f, in_f) in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            names = [f"{pre}mlp.experts.{e}.{proj}." for e in range(n_exp)]
            path = (*at, "mlp", proj)
            if cfg.quantization is None:
                out.append(Entry(path, None, tuple(x + "weight" for x in names), (out_f, in_f), _same, _same,
                                 experts=True))
            else:
                g = cfg.quantization.group_size
                out += [
                    Entry(path, "packed", tuple(x + "weight_packed" for x in names), (out_f, -(-in_f // 8)),
                          _same, _same, dtypes=("I32",), experts=True),
                    Entry(path, "scale", tuple(x + "weight_scale" for x in names), (out_f, in_f // g), _same, _same,
                          experts=True),
                ]
    return out


def _mlp(path, prefix, d, f) -> list[Entry]:
    return [Entry((*path, "gate_proj"), None, (prefix + "gate_proj.weight",), (f, d), _same, _same),
            Entry((*path, "up_proj"), None, (prefix + "up_proj.weight",), (f, d), _same, _same),
            Entry((*path, "down_proj"), None, (prefix + "down_proj.weight",), (d, f), _same, _same)]


def weight_shape_names(cfg: Config) -> dict[str, tuple[int, int]]:
    """compressed-tensors' `weight_shape` tensors and the [out, in] each must hold."""
    if cfg.quantization is None or not cfg.n_moe_layers:
        return {}
    f, d = cfg.moe_intermediate_size, cfg.hidden_size
    out = {}
    for i in range(cfg.n_dense_layers, cfg.num_hidden_layers):
        for e in range(cfg.n_routed_experts):
            for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                out[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight_shape"] = shape
    return out


# ---- reading ------------------------------------------------------------------------------------

class CheckpointReader:
    """The tensors of a HF checkpoint directory (sharded with an index, or one model.safetensors).

    Opening reads and checks every shard's header; tensor data is only touched by `copy_into`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"{self.dir}: checkpoint directory not found")
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        try:
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({e!s})") from None
            elif os.path.isfile(single):
                self.files["model.safetensors"] = SafetensorsFile(single)
                weight_map = {name: "model.safetensors" for name in self.files["model.safetensors"].tensors}
            else:
                raise CheckpointError(f"{self.dir}: no model.safetensors.index.json or model.safetensors")
            for file in sorted(set(weight_map.values()) - set(self.files)):
                path = os.path.join(self.dir, file)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard listed in the index is missing")
                self.files[file] = SafetensorsFile(path)
        except BaseException:
            self.close()
            raise
        self.weight_map: dict[str, str] = weight_map

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def file_of(self, name: str) -> str:
        return os.path.join(self.dir, self.weight_map[name])

    def info(self, name: str) -> TensorInfo | None:
        """dtype, shape and place of a tensor, or None if its shard does not hold it."""
        return self.files[self.weight_map[name]].tensors.get(name)

    def check(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        info = self.info(name)
        if info is None:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' listed in the index is not in the file")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has dtype {info.dtype}, "
                                  f"expected {' or '.join(dtypes)}")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has shape {list(info.shape)}, "
                                  f"expected {list(shape)}")

    def copy_into(self, name: str, out: np.ndarray, select=None) -> None:
        """Copy tensor `name` (or the view `select` makes of it) into `out`: see SafetensorsFile."""
        self.files[self.weight_map[name]].copy_into(name, out, select)

    def get(self, name: str) -> np.ndarray:
        info = self.info(name)
        out = np.empty(info.shape, info.np_dtype)
        self.copy_into(name, out)
        return out


def validate(reader: CheckpointReader, cfg: Config) -> None:
    """Check every tensor the model needs before anything is allocated."""
    packed = [n for n in reader.weight_map if n.endswith(".weight_packed")]
    if packed and cfg.quantization is None:
        raise CheckpointError(f"{reader.file_of(packed[0])}: tensor '{packed[0]}' is packed int4 but "
                              "config.json has no quantization_config")
    for entry in layout(cfg):
        for name in entry.hf:
            reader.check(name, entry.hf_shape, entry.dtypes)
    if cfg.quantization is not None:
        for name, want in weight_shape_names(cfg).items():
            reader.check(name, (2,), INT_DTYPES)
            got = tuple(int(x) for x in reader.get(name))
            if got != want:
                raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' = {list(got)} disagrees with "
                                      f"config.json, which implies {list(want)}")
        expected = {n for e in layout(cfg) if e.leaf == "packed" for n in e.hf}
        stray = sorted(set(packed) - expected)
        if stray:
            raise CheckpointError(f"{reader.file_of(stray[0])}: tensor '{stray[0]}' is quantized but this runtime "
                                  "only supports quantized routed experts")


# ---- loading ------------------------------------------------------------------------------------
#
# Every parameter is built from the blocks its devices hold: each distinct block is read once,
# straight from the mapped file into a fresh page-aligned buffer, and put on the devices that
# hold it. On CPU that buffer becomes the device array itself (XLA adopts aligned host buffers), so
# the bytes are copied exactly once, like `cat`; on an accelerator the buffer is the source of the
# host-to-device copy and is dropped once that is done. Parameters load on a pool of threads (numpy
# releases the GIL while it copies), and a byte budget bounds the host memory held by blocks not
# yet on their devices.

def convert_on_host(platform: str, stored: np.dtype, dtype: np.dtype) -> bool:
    """Whether a stored tensor is converted to the parameter's dtype on the host, during the one
    copy out of the file, rather than on the device after the transfer. On CPU the host is the
    device, and the copy converts for free; elsewhere the conversion happens on whichever side
    makes the bytes that cross to the device fewer. (Same dtypes: nothing to convert.)"""
    return platform == "cpu" or dtype.itemsize <= stored.itemsize


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One array to build: a parameter, or the packed words or scales of an INT4 parameter."""

    entry: Entry
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


def _new_block(shape, dtype: np.dtype) -> np.ndarray:
    """An array in fresh, page-aligned memory that the kernel faults in up front (MAP_POPULATE).

    Page alignment is what the CPU backend needs to adopt a host buffer as a device array instead
    of copying it. Faulting the pages in one call rather than one fault per page on first write
    halved the load time on our 2-core VM, where first touch of memory costs more than the read."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype).reshape(shape)


def _read_block(reader: CheckpointReader, entry: Entry, index: tuple, out: np.ndarray) -> None:
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
            block = _new_block(block_shape, host_dtype)
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
    by_leaf = {(entry.path, entry.leaf): entry for entry in layout(cfg)}
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


def relayout_experts(target_state, mesh=None, rules=DEFAULT_RULES) -> Callable:
    """transform(path, value) that moves an INT4 routed-expert parameter, loaded in the checkpoint
    layout, into the layout and sharding `target_state` (an abstract state) gives it. Runs on the
    devices, one parameter at a time; other parameters pass through."""
    targets = dict(nnx.to_flat_state(target_state))

    def transform(path, value):
        want = targets[path].get_value()
        if not isinstance(value, Int4Weight) or want.layout == value.layout:
            return value
        axes = param_axes(targets[path])

        def placed(a):
            return sharding_for(axes, a.shape, mesh, rules, name="/".join(map(str, path)))

        out = Int4Weight(placed(want.packed), placed(want.scale), want.in_features, want.layout)
        return jax.jit(lambda w: w.to_layout(want.layout), out_shardings=out)(value)

    return transform


def load_state(directory, cfg: Config, *, dtype=jnp.bfloat16, mesh=None, rules=DEFAULT_RULES,
               progress: bool = True, transform: Callable | None = None, workers: int | None = None,
               expert_layout: str | None = None):
    """(graphdef, state) of a `KimiK2` with the checkpoint's weights, placed per the mesh rules.

    INT4 routed experts are read in the checkpoint's layout and moved into `expert_layout`
    (default: what the devices' kernels read, `expert_layout_for`) as they are loaded.

    `transform(path, value)`, if given, is applied to each parameter once it is on its devices, in
    its final sharding, and its result is kept instead: the place for a backend-specific layout
    (a repacked INT4 expert layout, say), made on the device one parameter at a time so memory stays
    bounded. `value` is a jax.Array or, for INT4 routed experts, an `Int4Weight`.
    `workers` threads read in parallel (default: the CPU count, at most 8)."""
    expert_layout = expert_layout or expert_layout_for(cfg, platform_of(mesh))
    with CheckpointReader(directory) as reader:
        validate(reader, cfg)
        graphdef, state = abstract_model(cfg, dtype, expert_layout=expert_layout)
        flat = nnx.to_flat_state(state)
        stored = flat if expert_layout == "ct" else nnx.to_flat_state(abstract_model(cfg, dtype)[1])
        plan = _plan(reader, cfg, stored, mesh, rules)
        targets = dict(flat)
        relayout = relayout_experts(state, mesh, rules)
        # Host blocks in flight stay within the largest tensor the model reads, so peak host memory
        # beyond the loaded weights (those blocks plus the file pages being copied) is at most
        # twice that tensor.
        budget = _ByteBudget(max(reader.info(name).nbytes for p in plan for leaf in p.leaves.values()
                                 for name in leaf.entry.hf))

        def load(p: _Param):
            arrays = {name: _load_leaf(reader, leaf, budget) for name, leaf in p.leaves.items()}
            value = arrays[None] if p.in_features is None else \
                relayout(p.path, Int4Weight(arrays["packed"], arrays["scale"], p.in_features))
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
               transform: Callable | None = None, workers: int | None = None, expert_layout: str | None = None):
    """Load a HF-layout K2 checkpoint directory: returns (model, config). See `load_state`."""
    cfg = Config.from_hf(directory)
    graphdef, state = load_state(directory, cfg, dtype=dtype, mesh=mesh, rules=rules, progress=progress,
                                 transform=transform, workers=workers, expert_layout=expert_layout)
    return nnx.merge(graphdef, state), cfg


def iter_hf_tensors(model: KimiK2) -> Iterator[tuple[str, np.ndarray]]:
    """The model's parameters as official checkpoint tensors (names, [out, in] layout), one by one."""
    cfg = model.cfg
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    def host(path, leaf=None):
        value = flat[path].get_value()
        if leaf is not None:  # INT4 experts go out in the checkpoint's layout, whatever the device's
            value = getattr(value.to_layout("ct"), leaf)
        return np.asarray(jax.device_get(value))

    for entry in layout(cfg):
        arr = host(entry.path, entry.leaf)
        if entry.path[-1] == "k_b_proj":  # join the two halves of kv_b_proj
            v_half = host((*entry.path[:-1], "v_b_proj"))
            yield entry.hf[0], np.concatenate([arr, v_half], axis=1).reshape(-1, arr.shape[-1])
        elif entry.to_hf is None:
            continue
        elif entry.experts:
            yield from ((name, entry.to_hf(arr[e])) for e, name in enumerate(entry.hf))
        else:
            yield entry.hf[0], entry.to_hf(arr)
    for name, shape in weight_shape_names(cfg).items():
        yield name, np.asarray(shape, np.int64)


__all__ = ["CheckpointReader", "Entry", "KimiError", "layout", "load_model", "load_state", "iter_hf_tensors",
           "validate", "weight_shape_names"]
