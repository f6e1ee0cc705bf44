"""A stated, conservative model of the compiled steps' temporaries, for a GPU target planned on a
machine without its GPUs (XLA:GPU compiles only for GPUs it can see).

Temporaries are what a compiled program allocates beyond its arguments and outputs: activations,
kernel workspaces and the sampling buffers. They are small next to K2's weights and cache, so the
model trades precision for being safely above what XLA assigns. Per device and program:

    2 x (one layer's activations, every value of the layer alive at once, all in float32
         + the attention kernel's float32 partials
         + embedding rows, logits, and the sampler's full-vocabulary buffers)
    + per layer: its input and output rows in float32 and 1 MiB
    + 64 MiB for GEMM and collective workspaces

The per-layer term covers what a scheduler keeps across layers (an all-reduce in flight beside the
next layer's work); libtpu's buffer assignment of the same programs grows by a few MB a layer in a
128-token prefill. For K2 on tensor=8 this model gives 0.83 GB (prefill) and 0.15 GB (decode at
batch 1) where libtpu's whole-model compile for TPU v5p assigns 0.29 and 0.03 GB (BENCHMARKS.md);
tests/test_tpu_compile.py keeps the model above libtpu's figures.

Memory outside XLA's buffers (the CUDA context, NCCL, other processes) is what
XLA_PYTHON_CLIENT_MEM_FRACTION leaves over, and the planner fits against XLA's share only.
"""

from __future__ import annotations

F32 = 4
MIB = 2**20
WORKSPACE = 64 * MIB
PER_LAYER = 1 * MIB


def _split(n: int, parts: int) -> int:
    """A dimension's per-device size: split when the mesh axis divides it (else replicated)."""
    return n // parts if n % parts == 0 else n


def _layer_bytes(cfg, tokens: int, tensor: int, moe: bool) -> int:
    """Every activation of one layer for `tokens` tokens on one device, float32."""
    d, r, p = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    h = _split(cfg.num_attention_heads, tensor)
    attention = tokens * (2 * d  # the input and its norm
                          + (cfg.q_lora_rank or 0)  # q latent
                          + h * cfg.qk_head_dim  # q
                          + 2 * h * r + h * p  # absorbed q and its rope part, attention output latents
                          + 2 * (r + p)  # this chunk's cache rows, before and after the norm and rope
                          + h * cfg.v_head_dim  # values through W_UV
                          + d)  # o_proj
    if moe:
        k, f = cfg.num_experts_per_tok, _split(cfg.moe_intermediate_size, tensor)
        shared = _split(cfg.moe_intermediate_size * cfg.n_shared_experts, tensor)
        ffn = tokens * (2 * d  # the input and its norm
                        + 2 * cfg.n_routed_experts  # scores and biased choice
                        + 2 * k  # weights and ids
                        + 2 * k * d  # rows sorted by expert, and their outputs
                        + 3 * k * f  # gate, up, and their product
                        + 3 * shared  # the shared expert
                        + 2 * d)  # the mix and its all-reduce
    else:
        ffn = tokens * (2 * d + 3 * _split(cfg.intermediate_size, tensor) + 2 * d)
    return (attention + ffn) * F32


def _attention_partials(cfg, rows: int, queries: int, tensor: int, max_len: int) -> int:
    """The GPU attention kernel's float32 split partials (max, sum, output) for `rows` rows of
    `queries` tokens (kernels_pallas/paged_attention_gpu.py picks the split count)."""
    from kernels_pallas.paged_attention_gpu import attention_config

    hq = queries * _split(cfg.num_attention_heads, tensor)
    splits = attention_config(rows, hq, max_len)["n_splits"]
    return rows * splits * hq * (cfg.kv_lora_rank + 2) * F32


def _ends_bytes(cfg, tokens: int, rows: int, tensor: int) -> int:
    """Embedding rows, this device's logits, and the sampler's gathered logits, softmax, sorted
    values and their ids (full vocabulary, every row)."""
    v = cfg.vocab_size
    return (2 * tokens * cfg.hidden_size + rows * _split(v, tensor) + 4 * rows * v) * F32


def step_temporaries(cfg, spec, *, rows: int, queries: int, max_len: int) -> int:
    """Modelled temporaries of one program step on one device: `rows` rows (split over the mesh's
    data axis) of `queries` tokens each (a prefill chunk, or 1 for decode)."""
    local_rows = _split(rows, spec.data)
    tokens = local_rows * queries
    moe = cfg.n_moe_layers > 0
    layer = max(_layer_bytes(cfg, tokens, spec.tensor, moe), _layer_bytes(cfg, tokens, spec.tensor, False))
    once = layer + _attention_partials(cfg, local_rows, queries, spec.tensor, max_len) + \
        _ends_bytes(cfg, tokens, rows, spec.tensor)
    per_layer = 2 * tokens * cfg.hidden_size * F32 + PER_LAYER
    return 2 * once + cfg.num_hidden_layers * per_layer + WORKSPACE


def modelled(cfg, spec, *, batch: int, chunk: int, max_len: int) -> dict[str, int]:
    """{"prefill", "decode"} temporaries as the engine runs them: one prefill row of `chunk`
    tokens, and decode steps over `batch` rows."""
    return {"prefill": step_temporaries(cfg, spec, rows=1, queries=chunk, max_len=max_len),
            "decode": step_temporaries(cfg, spec, rows=batch, queries=1, max_len=max_len)}
