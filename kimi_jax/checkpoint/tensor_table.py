"""The checkpoint's tensor-name table: which official tensor(s) hold each parameter of `KimiK2`.

One table (`tensor_table`) says, for every parameter, which tensor(s) of a Hugging Face K2
checkpoint hold it, their stored shape and dtypes, and how a stored tensor becomes the parameter:
the model keeps the checkpoint's [out, in] orientation, so that is at most a reshape (heads split
out) or a view (the halves of kv_b_proj). The loader, the validation, the checkpoint writer
(export.py) and the test fixtures all read this table, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from kimi_jax.config import Config

FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I32", "I64")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
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


def tensor_table(cfg: Config) -> list[TensorEntry]:
    """Every parameter of a `KimiK2` of `cfg` (INT4 experts: their packed words and scales as two
    entries) with the checkpoint tensors behind it, in checkpoint order."""
    d, v, h = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    n, p, vd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    f, n_exp = cfg.moe_intermediate_size, cfg.n_routed_experts

    def one(path, name, shape, to_param=_same, to_hf=_same, **kw):
        return TensorEntry(path, None, (name,), shape, to_param, to_hf, **kw)

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
                out.append(TensorEntry(path, None, tuple(x + "weight" for x in names), (out_f, in_f), _same, _same,
                                 experts=True))
            else:
                g = cfg.quantization.group_size
                out += [
                    TensorEntry(path, "packed", tuple(x + "weight_packed" for x in names), (out_f, -(-in_f // 8)),
                          _same, _same, dtypes=("I32",), experts=True),
                    TensorEntry(path, "scale", tuple(x + "weight_scale" for x in names), (out_f, in_f // g), _same, _same,
                          experts=True),
                ]
    return out


def _mlp(path, prefix, d, f) -> list[TensorEntry]:
    return [TensorEntry((*path, "gate_proj"), None, (prefix + "gate_proj.weight",), (f, d), _same, _same),
            TensorEntry((*path, "up_proj"), None, (prefix + "up_proj.weight",), (f, d), _same, _same),
            TensorEntry((*path, "down_proj"), None, (prefix + "down_proj.weight",), (d, f), _same, _same)]


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
