"""Hugging Face checkpoint directories: the tensor-name table, validation, and loading.

One table (`layout`) says, for every parameter of `KimiK2`, which official tensor(s) hold it, their
shape, and how the stored [out, in] matrix becomes the model's (in, out) layout. The loader, the
checkpoint writer (export.py) and the test fixtures all read that table, so the three cannot drift.

Loading reads every shard's header first and checks each expected tensor's presence, dtype and
shape — nothing is allocated until the whole checkpoint is known to be good. Then each parameter is
built with `jax.make_array_from_callback`: every device shard is read from the memory-mapped files
tensor by tensor, so the host never holds a second full copy. Routed experts in compressed-tensors
`pack-quantized` form stay packed (int32 words + scales).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

from kimi_jax.config import Config
from kimi_jax.errors import CheckpointError, KimiError
from kimi_jax.model import KimiK2, abstract_model
from kimi_jax.quant import Int4Weight
from kimi_jax.sharding import DEFAULT_RULES, param_axes, sharding_for

FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I32", "I64")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ---- the layout table ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """One model parameter (or one leaf of an INT4 parameter) and where the checkpoint keeps it.

    `hf` is a name template with {i} for the layer and {e} for the expert; `hf_shape` the stored
    shape of one such tensor; `to_param`/`to_hf` convert one stored tensor to the parameter's
    per-layer/per-expert block and back."""

    path: tuple[str, ...]  # parameter path in the model state
    leaf: str | None  # None, or 'packed'/'scale' for Int4Weight parameters
    hf: str
    hf_shape: tuple[int, ...]
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stack: str | None = None  # 'dense_layers' / 'moe_layers' for per-layer parameters
    expert: bool = False  # one tensor per routed expert
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    f32: bool = False  # kept in float32 whatever the model dtype (router bias)

    def names(self, cfg: Config) -> list[str]:
        return [self.hf.format(i=i, e=e) for i, e in self.instances(cfg)]

    def instances(self, cfg: Config) -> list[tuple[int | None, int | None]]:
        layers = [None]
        if self.stack == "dense_layers":
            layers = list(range(cfg.n_dense_layers))
        elif self.stack == "moe_layers":
            layers = list(range(cfg.n_dense_layers, cfg.num_hidden_layers))
        experts = list(range(cfg.n_routed_experts)) if self.expert else [None]
        return [(i, e) for i in layers for e in experts]


def _t(w):
    return np.swapaxes(w, -1, -2)


def layout(cfg: Config) -> list[Entry]:
    d, v, h = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    n, p, vd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    same = (lambda w: w)
    out = [
        Entry(("embed",), None, "model.embed_tokens.weight", (v, d), same, same),
        Entry(("norm",), None, "model.norm.weight", (d,), same, same),
        Entry(("lm_head",), None, "lm_head.weight", (v, d), _t, _t),
    ]

    def heads_in(k_in, width):  # [h*width, k_in] -> [k_in, h, width]
        return (lambda w: w.T.reshape(k_in, h, width)), (lambda x: x.reshape(k_in, h * width).T)

    def kv_b(lo, hi):  # one half of kv_b_proj [h*(n+vd), r] viewed as [h, n+vd, r]
        return lambda w: w.reshape(h, n + vd, r)[:, lo:hi]

    def attn_entries(stack):
        pre = "model.layers.{i}."
        e = [
            Entry(("input_norm",), None, pre + "input_layernorm.weight", (d,), same, same),
            Entry(("post_attention_norm",), None, pre + "post_attention_layernorm.weight", (d,), same, same),
            Entry(("attn", "kv_a_proj"), None, pre + "self_attn.kv_a_proj_with_mqa.weight", (r + p, d), _t, _t),
            Entry(("attn", "kv_a_norm"), None, pre + "self_attn.kv_a_layernorm.weight", (r,), same, same),
            # kv_b_proj feeds two parameters; export.py joins them back.
            Entry(("attn", "k_b_proj"), None, pre + "self_attn.kv_b_proj.weight", (h * (n + vd), r), kv_b(0, n), None),
            Entry(("attn", "v_b_proj"), None, pre + "self_attn.kv_b_proj.weight", (h * (n + vd), r),
                  kv_b(n, n + vd), None),
            Entry(("attn", "o_proj"), None, pre + "self_attn.o_proj.weight", (d, h * vd),
                  lambda w: w.T.reshape(h, vd, d), lambda x: x.reshape(h * vd, d).T),
        ]
        if cfg.q_lora_rank is None:
            e.append(Entry(("attn", "q_proj"), None, pre + "self_attn.q_proj.weight", (h * (n + p), d),
                           *heads_in(d, n + p)))
        else:
            q = cfg.q_lora_rank
            e += [
                Entry(("attn", "q_a_proj"), None, pre + "self_attn.q_a_proj.weight", (q, d), _t, _t),
                Entry(("attn", "q_a_norm"), None, pre + "self_attn.q_a_layernorm.weight", (q,), same, same),
                Entry(("attn", "q_b_proj"), None, pre + "self_attn.q_b_proj.weight", (h * (n + p), q),
                      *heads_in(q, n + p)),
            ]
        return [dataclasses.replace(x, stack=stack) for x in e]

    def mlp_entries(prefix, path, f):
        return [
            Entry((*path, "gate_proj"), None, prefix + "gate_proj.weight", (f, d), _t, _t),
            Entry((*path, "up_proj"), None, prefix + "up_proj.weight", (f, d), _t, _t),
            Entry((*path, "down_proj"), None, prefix + "down_proj.weight", (d, f), _t, _t),
        ]

    if cfg.n_dense_layers:
        dense = attn_entries("dense_layers") + mlp_entries("model.layers.{i}.mlp.", ("mlp",), cfg.intermediate_size)
        out += [dataclasses.replace(x, stack="dense_layers") for x in dense]
    if cfg.n_moe_layers:
        e_count, f = cfg.n_routed_experts, cfg.moe_intermediate_size
        moe = attn_entries("moe_layers") + [
            Entry(("mlp", "router"), None, "model.layers.{i}.mlp.gate.weight", (e_count, d), _t, _t),
            Entry(("mlp", "router_bias"), None, "model.layers.{i}.mlp.gate.e_score_correction_bias",
                  (e_count,), same, same, f32=True),
        ]
        if cfg.n_shared_experts:
            moe += mlp_entries("model.layers.{i}.mlp.shared_experts.", ("mlp", "shared"), f * cfg.n_shared_experts)
        ex = "model.layers.{i}.mlp.experts.{e}."
        for proj, (out_f, in_f) in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            if cfg.quantization is None:
                moe.append(Entry(("mlp", proj), None, ex + proj + ".weight", (out_f, in_f), _t, _t, expert=True))
            else:
                g = cfg.quantization.group_size
                moe += [
                    Entry(("mlp", proj), "packed", ex + proj + ".weight_packed", (out_f, -(-in_f // 8)), same, same,
                          expert=True, dtypes=("I32",)),
                    Entry(("mlp", proj), "scale", ex + proj + ".weight_scale", (out_f, in_f // g), same, same,
                          expert=True),
                ]
        out += [dataclasses.replace(x, stack="moe_layers") for x in moe]
    return out


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
    """The tensors of a HF checkpoint directory (sharded with an index, or one model.safetensors)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"{self.dir}: checkpoint directory not found")
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!s})") from None
        elif os.path.isfile(single):
            weight_map = {name: "model.safetensors" for name in self._open(single).keys()}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors.index.json or model.safetensors")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self.headers: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in sorted(set(weight_map.values())):
            path = os.path.join(self.dir, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            handle = self._handles.setdefault(file, self._open(path))
            for name in handle.keys():
                sl = handle.get_slice(name)
                self.headers[name] = (sl.get_dtype(), tuple(sl.get_shape()))

    @staticmethod
    def _open(path):
        try:
            return safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None

    def file_of(self, name: str) -> str:
        return os.path.join(self.dir, self.weight_map[name])

    def check(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        if name not in self.headers:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' listed in the index is not in the file")
        dtype, got = self.headers[name]
        if dtype not in dtypes:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has dtype {dtype}, "
                                  f"expected {' or '.join(dtypes)}")
        if got != tuple(shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has shape {list(got)}, "
                                  f"expected {list(shape)}")

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor '{name}' ({e})") from None


def validate(reader: CheckpointReader, cfg: Config) -> None:
    """Check every tensor the model needs before anything is allocated."""
    packed = [n for n in reader.weight_map if n.endswith(".weight_packed")]
    if packed and cfg.quantization is None:
        raise CheckpointError(f"{reader.file_of(packed[0])}: tensor '{packed[0]}' is packed int4 but "
                              "config.json has no quantization_config")
    for entry in layout(cfg):
        for name in entry.names(cfg):
            reader.check(name, entry.hf_shape, entry.dtypes)
    if cfg.quantization is not None:
        for name, want in weight_shape_names(cfg).items():
            reader.check(name, (2,), INT_DTYPES)
            got = tuple(int(x) for x in reader.get(name))
            if got != want:
                raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' = {list(got)} disagrees with "
                                      f"config.json, which implies {list(want)}")
        expected = {n for e in layout(cfg) if e.leaf == "packed" for n in e.names(cfg)}
        stray = sorted(set(packed) - expected)
        if stray:
            raise CheckpointError(f"{reader.file_of(stray[0])}: tensor '{stray[0]}' is quantized but this runtime "
                                  "only supports quantized routed experts")


# ---- loading ------------------------------------------------------------------------------------

def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)


def _block_reader(reader: CheckpointReader, entry: Entry, cfg: Config, dtype):
    """A callback for make_array_from_callback: index (tuple of slices) -> that block as numpy."""
    inst = entry.instances(cfg)
    layers = sorted({i for i, _ in inst if i is not None})
    experts = sorted({e for _, e in inst if e is not None})
    lead = (1 if entry.stack else 0) + (1 if entry.expert else 0)

    def read(index):
        index = tuple(index)
        rest = index[lead:]
        layer_sel = layers[index[0]] if entry.stack else [None]
        expert_sel = experts[index[1 if entry.stack else 0]] if entry.expert else [None]
        rows = []
        for i in layer_sel:
            cols = [entry.to_param(reader.get(entry.hf.format(i=i, e=e)))[rest].astype(dtype) for e in expert_sel]
            rows.append(np.stack(cols) if entry.expert else cols[0])
        return np.ascontiguousarray(np.stack(rows) if entry.stack else rows[0])

    return read


def load_state(directory, cfg: Config, *, dtype=jnp.bfloat16, mesh=None, rules=DEFAULT_RULES,
               progress: bool = True):
    """(graphdef, state) of a `KimiK2` with the checkpoint's weights, placed per the mesh rules."""
    reader = CheckpointReader(directory)
    validate(reader, cfg)
    graphdef, state = abstract_model(cfg, dtype)
    flat = dict(nnx.to_flat_state(state))
    entries = layout(cfg)
    by_leaf = {}
    for entry in entries:
        by_leaf.setdefault((entry.path if entry.stack is None else (entry.stack, *entry.path), entry.leaf), entry)

    bar = tqdm(total=len(by_leaf), desc="loading", unit="tensor", disable=not progress, leave=False)
    for path, var in flat.items():
        value = var.get_value()
        axes = param_axes(path, var)
        leaves = {"packed": value.packed, "scale": value.scale} if isinstance(value, Int4Weight) else {None: value}
        loaded = {}
        for leaf, abs_arr in leaves.items():
            entry = by_leaf.get((path, leaf))
            if entry is None:
                raise AssertionError(f"no checkpoint entry for parameter {'/'.join(path)}")
            sharding = sharding_for(axes, abs_arr.shape, mesh, rules, name="/".join(path))
            want = jnp.float32 if entry.f32 else abs_arr.dtype
            if leaf == "scale":  # keep the stored scale dtype: dequant then rounds like compressed-tensors
                want = {"BF16": jnp.bfloat16, "F16": jnp.float16, "F32": jnp.float32}[
                    reader.headers[entry.names(cfg)[0]][0]]
            loaded[leaf] = jax.make_array_from_callback(
                abs_arr.shape, sharding, _block_reader(reader, entry, cfg, _np_dtype(want)))
            bar.update(1)
        new = Int4Weight(loaded["packed"], loaded["scale"], value.in_features) if isinstance(value, Int4Weight) \
            else loaded[None]
        var.set_value(new)
    bar.close()
    return graphdef, nnx.from_flat_state(flat)


def load_model(directory, *, dtype=jnp.bfloat16, mesh=None, rules=DEFAULT_RULES, progress: bool = True):
    """Load a HF-layout K2 checkpoint directory: returns (model, config)."""
    cfg = Config.from_hf(directory)
    graphdef, state = load_state(directory, cfg, dtype=dtype, mesh=mesh, rules=rules, progress=progress)
    return nnx.merge(graphdef, state), cfg


def iter_hf_tensors(model: KimiK2) -> Iterator[tuple[str, np.ndarray]]:
    """The model's parameters as official checkpoint tensors (names, [out, in] layout), one by one."""
    cfg = model.cfg
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for entry in layout(cfg):
        key = entry.path if entry.stack is None else (entry.stack, *entry.path)
        value = flat[key].get_value()
        if entry.leaf is not None:
            value = getattr(value, entry.leaf)
        arr = np.asarray(jax.device_get(value))
        for k, (i, e) in enumerate(entry.instances(cfg)):
            block = arr
            if entry.stack:
                block = block[i - (cfg.n_dense_layers if entry.stack == "moe_layers" else 0)]
            if entry.expert:
                block = block[e]
            name = entry.hf.format(i=i, e=e)
            if entry.path[-1] == "k_b_proj":  # join the two halves of kv_b_proj
                v_key = (entry.stack, "attn", "v_b_proj")
                v_block = np.asarray(jax.device_get(flat[v_key].get_value()))
                v_block = v_block[i - (cfg.n_dense_layers if entry.stack == "moe_layers" else 0)]
                yield name, np.concatenate([block, v_block], axis=1).reshape(-1, block.shape[-1])
            elif entry.path[-1] == "v_b_proj":
                continue
            else:
                yield name, entry.to_hf(block)
    for name, shape in weight_shape_names(cfg).items():
        yield name, np.asarray(shape, np.int64)


__all__ = ["CheckpointReader", "Entry", "KimiError", "layout", "load_model", "load_state", "iter_hf_tensors",
           "validate", "weight_shape_names"]
