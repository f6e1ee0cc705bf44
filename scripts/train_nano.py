"""Train kimi-k2-nano: a few-million-parameter K2-architecture model that thinks, calls tools and
answers, with INT4 quantization-aware training of its routed experts, exported in the official
Kimi-K2-Thinking checkpoint layout.

    python scripts/make_agent_data.py            # out/agent_data/{train,eval}.jsonl
    python scripts/build_tokenizer.py            # out/nano_tokenizer/
    python scripts/train_nano.py                 # checkpoints/kimi-k2-nano/ (+ out/nano_float/)

Phases: (1) ordinary training of all weights; (2) QAT — the routed experts pass through symmetric
INT4 group-32 fake quantization with a straight-through gradient, so the model learns weights that
survive the exact rounding the export applies. The export quantizes with the same quantizer
(kernels_pallas.int4) and writes through kimi_jax.export, the code path that fixtures use and the
loader reads. The float weights before QAT go to out/nano_float for the PTQ comparison.

Each training sample is one conversation as the model sees it at its last step: the prompt
rendered by the chat template (earlier steps of the running tool loop keep their reasoning) plus the
final answer; the loss covers every assistant output of that turn (reasoning, tool calls, answer,
<|im_end|>), nothing the user or the tools wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np


def nano_config(tokenizer):
    from kimi_jax.config import Config, Yarn

    return Config(
        vocab_size=tokenizer.n_vocab, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
        num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.827,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        num_attention_heads=4, rope_theta=50000.0,
        # K2's YaRN shape (factor x original context, beta 1/1) at nano scale: 4 x 256 = 1024 positions.
        rope_scaling=Yarn(factor=4.0, original_max_position_embeddings=256),
        max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.im_end_id,
        pad_token_id=tokenizer.token_id("[PAD]"), quantization=None)


# ---- data -------------------------------------------------------------------------------------

def encode_sample(item, tokenizer, template):
    """(ids, loss mask) of one conversation as seen at its final step."""
    from kimi_jax.chat import format_output
    from kimi_jax.chat.prompt import encode_chat

    messages, tools = item["messages"], item.get("tools") or None
    ids = encode_chat(tokenizer, template, messages[:-1], tools, add_generation_prompt=True)
    ids = ids + tokenizer.encode(format_output(messages[-1]), allow_special=True)
    mask = np.zeros(len(ids), np.float32)
    turn_start = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for a, m in enumerate(messages):
        if a > turn_start and m["role"] == "assistant":
            start = len(encode_chat(tokenizer, template, messages[:a], tools, add_generation_prompt=True))
            end = ids.index(tokenizer.im_end_id, start) + 1
            mask[start:end] = 1.0
    return np.asarray(ids, np.int32), mask


def load_samples(path, tokenizer, template, seq_len, vocab_file, cache_dir=None):
    """Tokenized, padded samples; cached in `cache_dir` keyed by the data, vocabulary and length."""
    import hashlib

    digest = hashlib.sha256()
    for file in (path, vocab_file):
        with open(file, "rb") as f:
            digest.update(f.read())
    digest.update(str(seq_len).encode())
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{digest.hexdigest()[:16]}.npz") if cache_dir else None
    if cache and os.path.isfile(cache):
        z = np.load(cache)
        return z["tokens"].astype(np.int32), z["mask"].astype(np.float32), int(z["dropped"]), int(z["longest"])
    ids, masks, dropped = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            x, m = encode_sample(json.loads(line), tokenizer, template)
            if len(x) > seq_len:
                dropped += 1
                continue
            ids.append(x)
            masks.append(m)
    pad = tokenizer.token_id("[PAD]")
    tokens = np.full((len(ids), seq_len), pad, np.int32)
    loss_mask = np.zeros((len(ids), seq_len), np.float32)
    for i, (x, m) in enumerate(zip(ids, masks)):
        tokens[i, :len(x)] = x
        loss_mask[i, :len(m)] = m
    longest = max(len(x) for x in ids)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez_compressed(cache, tokens=tokens.astype(np.uint16), mask=loss_mask.astype(np.uint8), dropped=dropped,
                            longest=longest)
    return tokens, loss_mask, dropped, longest



# ---- training ---------------------------------------------------------------------------------

def fake_quantize(w_in_out, group_size: int):
    """What the INT4 export will turn dense (in, out) weights into, with a straight-through gradient.

    Groups run along the input dim, as in the checkpoint. Scale (absmax / 7.5, rounded to bf16),
    rounding and clamping match `kernels_pallas.int4.quantize_int4`, and the product is rounded to
    bf16 like the reference dequant, so a QAT-trained model sees in training exactly the weights it
    will be served with. The backward pass treats the rounding as identity (STE)."""
    import jax
    import jax.numpy as jnp

    from kernels_pallas import int4 as int4_layout

    *lead, k, n = w_in_out.shape
    g = w_in_out.reshape(*lead, k // group_size, group_size, n).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(g), axis=-2, keepdims=True)
    scale = (absmax / ((int4_layout.QMAX - int4_layout.QMIN) / 2)).astype(jnp.bfloat16).astype(jnp.float32)
    scale = jnp.where(scale == 0, jnp.finfo(jnp.bfloat16).eps.astype(jnp.float32), scale)
    q = jnp.clip(jnp.round(g / scale), int4_layout.QMIN, int4_layout.QMAX)
    deq = (q * scale).astype(jnp.bfloat16).astype(jnp.float32).reshape(w_in_out.shape)
    return w_in_out + jax.lax.stop_gradient(deq.astype(w_in_out.dtype) - w_in_out)


def make_train_step(graphdef, optimizer, group_size):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kimi_jax.quant import is_routed_expert

    def with_fake_quant(state):
        flat = []
        for path, var in nnx.to_flat_state(state):
            if is_routed_expert(path, var):
                var = var.replace(fake_quantize(var.get_value(), group_size))
            flat.append((path, var))
        return nnx.from_flat_state(flat)

    def loss_fn(state, tokens, mask, qat):
        model = nnx.merge(graphdef, with_fake_quant(state) if qat else state)
        logits = model.forward_no_cache(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        m = mask[:, 1:]
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    def step(state, opt_state, tokens, mask, qat):
        loss, grads = jax.value_and_grad(loss_fn)(state, tokens, mask, qat)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1), static_argnums=(4,)), jax.jit(loss_fn, static_argnums=(3,))


def train(args):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kimi_jax.chat import ChatTemplate, Tokenizer
    from kimi_jax.model import KimiK2

    tokenizer = Tokenizer.from_dir(args.tokenizer)
    template = ChatTemplate.default()
    cfg = nano_config(tokenizer)
    t0 = time.perf_counter()
    vocab = os.path.join(args.tokenizer, "tiktoken.model")
    tokens, mask, dropped, longest = load_samples(os.path.join(args.data, "train.jsonl"), tokenizer, template,
                                                  args.seq_len, vocab, args.cache)
    ev_tokens, ev_mask, _, _ = load_samples(os.path.join(args.data, "eval.jsonl"), tokenizer, template, args.seq_len,
                                            vocab, args.cache)
    log(f"{len(tokens)} training samples (longest {longest} tokens, {dropped} over {args.seq_len} dropped), "
        f"{len(ev_tokens)} eval samples, tokenized in {time.perf_counter() - t0:.0f}s")

    model = KimiK2(cfg, dtype=jnp.float32, rngs=nnx.Rngs(params=args.seed))
    graphdef, state = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    total = args.steps + args.qat_steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(200, total // 10), total, args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05))
    opt_state = optimizer.init(state)
    step_fn, eval_fn = make_train_step(graphdef, optimizer, args.group_size)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(tokens))
    pos = 0
    log(f"model: {n_params / 1e6:.2f}M parameters; {args.steps} steps + {args.qat_steps} QAT steps of "
        f"{args.batch} x {args.seq_len} tokens on {jax.devices()[0].platform}")

    def evaluate(qat):
        losses = [float(eval_fn(state, jnp.asarray(ev_tokens[i:i + args.batch]), jnp.asarray(ev_mask[i:i + args.batch]),
                                qat)) for i in range(0, len(ev_tokens) - args.batch + 1, args.batch)]
        return float(np.mean(losses)) if losses else float("nan")

    float_state = None
    t_train = time.perf_counter()
    for step in range(total):
        qat = step >= args.steps
        if qat and float_state is None:
            float_state = jax.tree.map(lambda x: np.asarray(x), state)
            log(f"float model: eval loss {evaluate(False):.4f}; INT4 fake-quant eval loss {evaluate(True):.4f}")
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(tokens)), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        state, opt_state, loss = step_fn(state, opt_state, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]), qat)
        if step % args.log_every == 0 or step == total - 1:
            elapsed = time.perf_counter() - t_train
            log(f"step {step:5d} {'qat ' if qat else ''}loss {float(loss):.4f}  ({elapsed:.0f}s)")
    if float_state is None:
        float_state = jax.tree.map(lambda x: np.asarray(x), state)
    log(f"QAT model: INT4 fake-quant eval loss {evaluate(True):.4f}; training took "
        f"{time.perf_counter() - t_train:.0f}s")
    return cfg, tokenizer, nnx.merge(graphdef, state), nnx.merge(graphdef, float_state), time.perf_counter() - t_train


# ---- export -----------------------------------------------------------------------------------

def write_model_dir(out, model, tokenizer_dir, generation_config):
    from kimi_jax import export
    from kimi_jax.chat import ChatTemplate
    from kimi_jax.checkpoint import iter_hf_tensors

    if os.path.isdir(out):
        shutil.rmtree(out)
    export.write_checkpoint(out, model.cfg, iter_hf_tensors(model), generation_config=generation_config)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(ChatTemplate.default().source)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="out/agent_data")
    ap.add_argument("--tokenizer", default="out/nano_tokenizer")
    ap.add_argument("--out", default="checkpoints/kimi-k2-nano")
    ap.add_argument("--float-out", default="out/nano_float", help="pre-QAT float weights (for the PTQ row)")
    ap.add_argument("--cache", default="out/nano_cache", help="tokenized-data cache directory")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--qat-steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=416)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    from kimi_jax.export import quantize_experts

    cfg, tokenizer, model, float_model, seconds = train(args)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(tokenizer.stop_ids), "do_sample": False,
           "max_new_tokens": 256}
    write_model_dir(args.float_out, float_model, args.tokenizer, gen)
    write_model_dir(args.out, quantize_experts(model, args.group_size), args.tokenizer, gen)
    with open(os.path.join(args.out, "training.json"), "w", encoding="utf-8") as f:
        json.dump({"command": "python scripts/train_nano.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "args": vars(args), "train_seconds": round(seconds, 1),
                   "config": dataclasses.asdict(cfg)}, f, indent=2, default=str)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    log(f"wrote {args.out} ({size / 1e6:.1f} MB) and {args.float_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
