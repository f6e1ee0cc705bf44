"""Write a checkpoint directory in the official Kimi-K2-Thinking format: a model's parameters as the
official tensors (`iter_hf_tensors`), the directory's files (`write_checkpoint`), and post-training
INT4 quantization of a float model's routed experts into that format (`quantize_experts`).

Used by the test fixtures, `scripts/make_fixture_checkpoint.py` and the nano model's export, so
everything this project ships or tests is written by the same code, through the same tensor table
(checkpoint/tensor_table.py) that the loader reads.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from kimi_jax.checkpoint.tensor_table import tensor_table, weight_shape_names
from kimi_jax.config import Config


def _stored(name: str, arr: np.ndarray, float_dtype) -> np.ndarray:
    if arr.dtype.kind in "iu":
        return arr  # packed int4 words (int32) and weight_shape (int64) as they are
    if name.endswith("e_score_correction_bias"):
        return arr.astype(np.float32)  # float32 in the official checkpoints (docs/k2-format.md §2.2)
    return arr.astype(float_dtype)


def iter_hf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """The model's parameters as official checkpoint tensors (names, [out, in] layout), one by one."""
    import jax
    from flax import nnx

    cfg = model.cfg
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    def host(path, leaf=None):
        value = flat[path].get_value()
        if leaf is not None:  # INT4 experts go out in the checkpoint's packing, whatever the device's
            value = getattr(value.to_packing("ct"), leaf)
        return np.asarray(jax.device_get(value))

    for entry in tensor_table(cfg):
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


def write_checkpoint(directory, cfg: Config, tensors: Iterable[tuple[str, np.ndarray]], *,
                     float_dtype=ml_dtypes.bfloat16, max_shard_bytes: int = 2 << 30,
                     generation_config: dict | None = None) -> None:
    """config.json, safetensors shards, model.safetensors.index.json and generation_config.json.

    Shards are named like the official ones, `model-00001-of-000062.safetensors` (five digits for
    the shard, six for the total — the release's own quirk)."""
    os.makedirs(directory, exist_ok=True)
    # Each shard is written as soon as it is full, so memory holds one shard, not the checkpoint; the
    # names carry the shard count, known only at the end, so shards are renamed then.
    written: list[tuple[str, list[str]]] = []  # (temporary path, tensor names)
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        path = os.path.join(directory, f".shard-{len(written) + 1:05d}.safetensors.partial")
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, arr in tensors:
        arr = np.ascontiguousarray(_stored(name, arr, float_dtype))
        if shard and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if shard or not written:
        flush()
    weight_map = {}
    for k, (path, names) in enumerate(written, 1):
        file = f"model-{k:05d}-of-{len(written):06d}.safetensors"
        os.replace(path, os.path.join(directory, file))
        weight_map.update({name: file for name in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    gen = generation_config if generation_config is not None else {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)


def quantize_experts(model, group_size: int = 32):
    """Post-training quantization: a copy of `model` whose routed experts are packed INT4 (the
    checkpoint format), everything else unchanged. Used to export and to evaluate PTQ."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax import quant
    from kimi_jax.config import Int4Quant
    from kimi_jax.model import abstract_model

    cfg = model.cfg.replace(quantization=Int4Quant(group_size=group_size))
    src = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, state = abstract_model(cfg, model.dtype)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        value = src[path].get_value()
        if quant.is_routed_expert(path, var):
            value = quant.quantize(np.asarray(jax.device_get(value)), group_size, jnp.bfloat16)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
