"""Hugging Face checkpoint directories: the tensor-name table, validation, and loading.

One table (`layout`) says, for every parameter of `KimiK2`, which official tensor(s) hold it, their
shape, and how a stored tensor becomes the parameter: the model keeps the checkpoint's [out, in]
orientation, so that is at most a reshape (heads split out) or a view (the halves of kv_b_proj). The loader, the
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

def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)


def _block_reader(reader: CheckpointReader, entry: Entry, dtype):
    """A callback for make_array_from_callback: index (tuple of slices) -> that block as numpy.

    A routed-expert parameter's first axis picks expert tensors, so a device holding some experts
    reads only theirs."""

    def read(index):
        index = tuple(index)
        if not entry.experts:
            return entry.to_param(reader.get(entry.hf[0]))[index].astype(dtype, copy=False)
        names = entry.hf[index[0]] if index else entry.hf
        return np.stack([entry.to_param(reader.get(name))[index[1:]].astype(dtype, copy=False) for name in names])

    return read


def load_state(directory, cfg: Config, *, dtype=jnp.bfloat16, mesh=None, rules=DEFAULT_RULES,
               progress: bool = True):
    """(graphdef, state) of a `KimiK2` with the checkpoint's weights, placed per the mesh rules."""
    reader = CheckpointReader(directory)
    validate(reader, cfg)
    graphdef, state = abstract_model(cfg, dtype)
    flat = dict(nnx.to_flat_state(state))
    by_leaf = {(entry.path, entry.leaf): entry for entry in layout(cfg)}

    bar = tqdm(total=len(by_leaf), desc="loading", unit="tensor", disable=not progress, leave=False)
    for path, var in flat.items():
        value = var.get_value()
        axes = param_axes(var)
        leaves = {"packed": value.packed, "scale": value.scale} if isinstance(value, Int4Weight) else {None: value}
        loaded = {}
        for leaf, abs_arr in leaves.items():
            entry = by_leaf.get((path, leaf))
            if entry is None:
                raise AssertionError(f"no checkpoint entry for parameter {'/'.join(map(str, path))}")
            sharding = sharding_for(axes, abs_arr.shape, mesh, rules, name="/".join(map(str, path)))
            want = jnp.float32 if entry.f32 else abs_arr.dtype
            if leaf == "scale":  # keep the stored scale dtype: dequant then rounds like compressed-tensors
                want = {"BF16": jnp.bfloat16, "F16": jnp.float16, "F32": jnp.float32}[reader.headers[entry.hf[0]][0]]
            loaded[leaf] = jax.make_array_from_callback(abs_arr.shape, sharding,
                                                        _block_reader(reader, entry, _np_dtype(want)))
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

    def host(path, leaf=None):
        value = flat[path].get_value()
        return np.asarray(jax.device_get(value if leaf is None else getattr(value, leaf)))

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
