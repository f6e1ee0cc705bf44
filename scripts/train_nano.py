"""Train kimi-k2-nano: a small K2-architecture model that thinks, calls tools and answers, with INT4
quantization-aware training of its routed experts, exported in the official Kimi-K2-Thinking layout.

    python scripts/make_agent_data.py --n-train 30000   # out/agent_data/*.jsonl
    python scripts/build_tokenizer.py                    # out/nano_tokenizer/
    python scripts/train_nano.py --max-train-seconds 8400 --workers 2   # out/kimi-k2-nano/ (+ out/nano_float/)

The defaults are the recipe of the shipped v2, sized for a shared 2-core CPU: the "small" model,
8 rows of 512 tokens a step, at most 1400 + 200 steps, shrunk to fit the time given. The result
replaces checkpoints/kimi-k2-nano only after scripts/eval_nano.py shows it beats the shipped one.
(scripts/nano_pipeline.py runs all three with a bigger recipe in one 10-minute call on a lent GPU.)
Run the scripts from the repository root with PYTHONPATH=. so they import this checkout's kimi_jax.

Phases: (1) ordinary training of all weights; (2) QAT — the routed experts pass through symmetric
INT4 group-32 fake quantization with a straight-through gradient (`fake_quantize`), so the model
learns weights that survive the exact rounding the export applies. The float weights at the end of
phase 1 are exported to --float-out at once, for the bf16 and PTQ rows of the evaluation.

Each user turn of a conversation is one sample: the prompt as the agent loop renders it at that
turn's last step (earlier turns without their reasoning, earlier steps of this turn with it) plus
the final answer; the loss covers every assistant output of that turn (reasoning, tool calls,
answer, <|im_end|>), nothing the user or the tools wrote. Samples are packed into rows of
--row-len tokens, and the prefix of all nine tool declarations is computed once per batch instead
of once per sample (scripts/nano_packing.py): what makes training fit a CPU.

Resumable: every --checkpoint-every steps the parameters, optimizer state and data position go to
--train-state (atomically); `--resume` continues from there and reaches the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nano_packing  # noqa: E402 - a sibling script
from nano_packing import PackedBatches  # noqa: E402

# ---- model: the only code here that knows how the model is built or which weights are experts ----

MODEL_SIZES = {
    # The shape of the shipped model, v1 and v2 (8.5M parameters, 10.4 MB in the INT4 layout): what a
    # 2-core CPU trains in a session (v2).
    "small": dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=256, num_hidden_layers=4,
                  n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4),
    # Deeper and wider where copying needs it (attention), 15.4M parameters, 16.5 MB: for a lent GPU.
    "large": dict(hidden_size=320, intermediate_size=960, moe_intermediate_size=256, num_hidden_layers=6,
                 n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=160, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=6),
    # For tests: seconds per step on a CPU.
    "toy": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2),
}


def nano_config(tokenizer, size: str = "small"):
    from kimi_jax.config import Config, Yarn

    return Config(
        vocab_size=tokenizer.n_vocab, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, rope_theta=50000.0,
        # K2's YaRN shape (factor x original context, beta 1/1) at nano scale: 4 x 256 = 1024 positions.
        rope_scaling=Yarn(factor=4.0, original_max_position_embeddings=256),
        max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.im_end_id,
        pad_token_id=tokenizer.token_id("[PAD]"), quantization=None, **MODEL_SIZES[size])


def build_float_model(cfg, seed: int):
    """The trainable model: float32 weights, routed experts dense (quantized only at export)."""
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.model import KimiK2

    return KimiK2(cfg, dtype=jnp.float32, rngs=nnx.Rngs(params=seed))


def fake_quantize(w_out_in, group_size: int):
    """What the INT4 export will turn dense [..., out, in] weights into, with a straight-through
    gradient.

    Groups run along the input dim, as in the checkpoint. Scale (absmax / 7.5, rounded to bf16),
    rounding and clamping match `kernels_pallas.int4_ct.quantize_int4`, and the product is rounded to
    bf16 like the reference dequant, so a QAT-trained model sees in training exactly the weights it
    will be served with. The backward pass treats the rounding as identity (STE)."""
    import jax
    import jax.numpy as jnp

    from kernels_pallas import int4_ct

    *lead, n, k = w_out_in.shape
    g = w_out_in.reshape(*lead, n, k // group_size, group_size).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
    scale = (absmax / ((int4_ct.QMAX - int4_ct.QMIN) / 2)).astype(jnp.bfloat16).astype(jnp.float32)
    scale = jnp.where(scale == 0, jnp.finfo(jnp.bfloat16).eps.astype(jnp.float32), scale)
    q = jnp.clip(jnp.round(g / scale), int4_ct.QMIN, int4_ct.QMAX)
    deq = (q * scale).astype(jnp.bfloat16).astype(jnp.float32).reshape(w_out_in.shape)
    return w_out_in + jax.lax.stop_gradient(deq.astype(w_out_in.dtype) - w_out_in)


def with_fake_quantized_experts(state, group_size: int):
    """The model state as QAT sees it: routed-expert weights through `fake_quantize`, all else as is.
    Which weights are experts is `kimi_jax.quant.is_routed_expert`'s call, as for the export."""
    from flax import nnx

    from kimi_jax.quant import is_routed_expert

    flat = []
    for path, var in nnx.to_flat_state(state):
        if is_routed_expert(path, var):
            var = var.replace(fake_quantize(var.get_value(), group_size))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


# ---- data -------------------------------------------------------------------------------------

def turn_samples(item, tokenizer, template):
    """[(ids, loss mask)], one per user turn: the conversation up to that turn's answer, as the agent
    loop renders it at the turn's last step, with the turn's assistant outputs masked in."""
    from kimi_jax.chat import format_output
    from kimi_jax.chat.prompt import encode_chat

    messages, tools = item["messages"], item.get("tools") or None
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    assistant, middle, im_end = (tokenizer.token_id(t) for t in ("<|im_assistant|>", "<|im_middle|>", "<|im_end|>"))
    out = []
    for t, start in enumerate(users):
        end = users[t + 1] if t + 1 < len(users) else len(messages)
        ids = encode_chat(tokenizer, template, messages[:end - 1], tools, add_generation_prompt=True)
        ids = ids + tokenizer.encode(format_output(messages[end - 1]), allow_special=True)
        arr = np.asarray(ids, np.int32)
        mask = np.zeros(len(ids), np.float32)
        turn_begin = np.flatnonzero(arr == tokenizer.token_id("<|im_user|>"))[-1]
        for a in np.flatnonzero(arr == assistant):
            if a < turn_begin:
                continue
            body = a + int(np.flatnonzero(arr[a:] == middle)[0]) + 1  # after "<|im_assistant|>assistant<|im_middle|>"
            mask[body:a + int(np.flatnonzero(arr[a:] == im_end)[0]) + 1] = 1.0
        out.append((arr, mask))
    return out


def _encode_lines(args):
    lines, tokenizer_dir = args
    from kimi_jax.chat import ChatTemplate, Tokenizer

    tokenizer, template = Tokenizer.from_dir(tokenizer_dir), ChatTemplate.default()
    return [s for line in lines for s in turn_samples(json.loads(line), tokenizer, template)]


def load_samples(path, tokenizer_dir, cache_dir=None, workers=1):
    """(tokens uint16, mask uint8, offsets int64 [n + 1]): every turn sample of a JSON-lines file,
    end to end (sample i is tokens[offsets[i]:offsets[i + 1]]); cached in `cache_dir` keyed by the
    data and the vocabulary, and encoded on `workers` processes."""
    digest = hashlib.sha256()
    for file in (path, os.path.join(tokenizer_dir, "tiktoken.model")):
        with open(file, "rb") as f:
            digest.update(f.read())
    digest.update(b"flat/v3")
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{digest.hexdigest()[:16]}.npz") if cache_dir else None
    if cache and os.path.isfile(cache):
        z = np.load(cache)
        return z["tokens"], z["mask"], z["offsets"]
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    chunks = [(lines[i:i + 500], tokenizer_dir) for i in range(0, len(lines), 500)]
    if workers > 1 and len(chunks) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            samples = [s for part in pool.map(_encode_lines, chunks) for s in part]
    else:
        samples = [s for chunk in chunks for s in _encode_lines(chunk)]
    if not samples:
        raise ValueError(f"{path}: no conversations")
    tokens = np.concatenate([x for x, _ in samples]).astype(np.uint16)
    mask = np.concatenate([m for _, m in samples]).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x, _ in samples])]).astype(np.int64)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, tokens=tokens, mask=mask, offsets=offsets)
        os.replace(tmp, cache)
    return tokens, mask, offsets


def all_tools_prefix(tokenizer):
    """The prefix samples share when they declare every builtin tool, as `--tools builtin` does."""
    from kimi_jax.chat import ChatTemplate
    from kimi_jax.tools import builtin_tools

    return nano_packing.shared_prefix(tokenizer, ChatTemplate.default(), builtin_tools().specs())


# ---- resumable training state -----------------------------------------------------------------

def save_train_state(directory, trees, meta: dict) -> None:
    """Every array leaf of `trees` (keyed by its pytree path) plus `meta`, replaced atomically."""
    import jax

    os.makedirs(directory, exist_ok=True)
    leaves = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
              for p, x in jax.tree_util.tree_flatten_with_path(trees)[0]}
    tmp = os.path.join(directory, "state.tmp.npz")
    np.savez(tmp, **leaves)
    with open(os.path.join(directory, "meta.tmp.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, "state.npz"))
    os.replace(os.path.join(directory, "meta.tmp.json"), os.path.join(directory, "meta.json"))


def load_train_state(directory, trees):
    """(`trees` with every leaf replaced by the saved one, meta). Errors name the first mismatch."""
    import jax

    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    saved = np.load(os.path.join(directory, "state.npz"))
    paths, treedef = jax.tree_util.tree_flatten_with_path(trees)
    leaves = []
    for p, x in paths:
        key = jax.tree_util.keystr(p)
        if key not in saved:
            raise ValueError(f"{directory}/state.npz: no saved leaf {key} (was it written by another model size?)")
        value = saved[key]
        if value.shape != np.shape(x):
            raise ValueError(f"{directory}/state.npz: {key} has shape {value.shape}, the model expects {np.shape(x)}")
        leaves.append(jax.numpy.asarray(value, dtype=x.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


# Arguments that must not change across a resume (the others — output paths, logging, checkpoint
# cadence, the time limit — may).
RECIPE_ARGS = ("size", "steps", "qat_steps", "batch", "row_len", "lr", "group_size", "seed")


# ---- training ---------------------------------------------------------------------------------

def make_train_step(graphdef, optimizer, group_size, accumulate: int = 1):
    """(jitted train step, jitted loss). The step splits its batch into `accumulate` micro-batches
    run one after another (summed gradients, the same update): memory for a CPU, speed for a GPU."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def loss_fn(state, batch, qat):
        # A token's target is the next token of its row; the first token of every sample is
        # prompt (mask 0), so no loss ever crosses from one packed sample into the next.
        model = nnx.merge(graphdef, with_fake_quantized_experts(state, group_size) if qat else state)
        logits = nano_packing.packed_forward(model, batch["prefix"], batch["tokens"], batch["positions"],
                                             batch["segments"], batch["shared"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
        m = batch["mask"][:, 1:]
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    def masked_sums(state, batch, qat):  # (loss x count, count): micro-batches add up exactly
        count = jnp.sum(batch["mask"][:, 1:])
        return loss_fn(state, batch, qat) * count, count

    def step(state, opt_state, batch, qat):
        if accumulate == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state, batch, qat)
        else:
            prefix = batch["prefix"]
            rows = {k: v.reshape(accumulate, v.shape[0] // accumulate, *v.shape[1:])
                    for k, v in batch.items() if k != "prefix"}

            def one(carry, micro):
                (total, count), grads = jax.value_and_grad(masked_sums, has_aux=True)(
                    state, {**micro, "prefix": prefix}, qat)
                return jax.tree.map(jnp.add, carry, (grads, total, count)), None

            zero = (jax.tree.map(jnp.zeros_like, state), jnp.float32(0), jnp.float32(0))
            (grads, total, count), _ = jax.lax.scan(one, zero, rows)
            count = jnp.maximum(count, 1.0)
            loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1), static_argnums=(3,)), jax.jit(loss_fn, static_argnums=(2,))


def train(args):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kimi_jax.chat import Tokenizer

    tokenizer = Tokenizer.from_dir(args.tokenizer)
    cfg = nano_config(tokenizer, args.size)
    prefix = all_tools_prefix(tokenizer)
    t0 = time.perf_counter()
    train_data = load_samples(os.path.join(args.data, "train.jsonl"), args.tokenizer, args.cache, args.workers)
    ev = PackedBatches(*load_samples(os.path.join(args.data, args.eval_set), args.tokenizer, args.cache, 1), prefix,
                       args.row_len, args.batch, 0, shuffle=False)

    graphdef, state = nnx.split(build_float_model(cfg, args.seed))
    # The learning rate lives in the optimizer state and is set from the host each step, so the plan
    # (and with it the schedule) can shrink to fit a time budget without recompiling.
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    opt_state = optimizer.init(state)
    plan = Plan(args.steps, args.qat_steps, args.lr)
    start, position, seconds_before, float_written = 0, (0, 0), 0.0, False
    if args.resume and os.path.isfile(os.path.join(args.train_state, "meta.json")):
        (state, opt_state), meta = load_train_state(args.train_state, (state, opt_state))
        changed = [k for k in RECIPE_ARGS if meta["args"][k] != vars(args)[k]]
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from the run saved in {args.train_state}")
        start, position, seconds_before = meta["step"], tuple(meta["data_position"]), meta["train_seconds"]
        float_written, (plan.steps, plan.qat_steps) = meta["float_written"], meta["plan"]
        log(f"resumed from {args.train_state} at step {start}")
    batches = PackedBatches(*train_data, prefix, args.row_len, args.batch, args.seed, position)
    log(f"{len(batches.lengths)} training samples ({batches.shared.mean():.0%} continue the {len(prefix)}-token "
        f"all-tools prefix; stored parts average {batches.lengths.mean():.0f} tokens; {batches.dropped} longer than "
        f"{args.row_len} dropped), {len(batches.plan)} batches an epoch ({batches.fill:.0%} of row tokens used); "
        f"{len(ev.lengths)} eval samples; data ready in {time.perf_counter() - t0:.0f}s")
    step_fn, eval_fn = make_train_step(graphdef, optimizer, args.group_size, args.accumulate)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    log(f"model '{args.size}': {n_params / 1e6:.2f}M parameters; steps {start}..{plan.total} ({plan.steps} float + "
        f"{plan.qat_steps} QAT) of {args.batch} rows x {args.row_len} tokens + the prefix on "
        f"{jax.devices()[0].platform}")

    def evaluate(qat):
        losses = [float(eval_fn(state, as_device(ev.arrays(rows)), qat)) for rows in ev.plan]
        return float(np.mean(losses))

    def checkpoint(step):
        meta = {"step": step, "data_position": batches.position, "args": vars(args), "float_written": float_written,
                "plan": [plan.steps, plan.qat_steps], "train_seconds": seconds_before + time.perf_counter() - t_train}
        save_train_state(args.train_state, (state, opt_state), meta)

    t_train, cpu0, step, step_seconds = time.perf_counter(), time.process_time(), start, []
    t_step = t_train
    while step < plan.total:
        qat = step >= plan.steps
        if qat and not float_written:
            log(f"float model: eval loss {evaluate(False):.4f}; INT4 fake-quant eval loss {evaluate(True):.4f}")
            write_model_dir(args.float_out, nnx.merge(graphdef, state), args.tokenizer, generation_config(cfg, tokenizer))
            float_written = True
        batch = as_device(batches.next())
        opt_state[1].hyperparams["learning_rate"] = jnp.float32(plan.lr_at(step))
        state, opt_state, loss = step_fn(state, opt_state, batch, qat)
        step += 1
        if args.max_train_seconds:  # the machine may be shared: re-plan as its speed changes
            jax.block_until_ready(loss)
            step_seconds.append(time.perf_counter() - t_step)
            t_step = time.perf_counter()
            if len(step_seconds) >= FIT_AFTER and (len(step_seconds) - FIT_AFTER) % REFIT_EVERY == 0:
                plan.fit(step, args.max_train_seconds - seconds_before - (t_step - t_train),
                         float(np.median(step_seconds[-RATE_WINDOW:])),
                         1.5 * sum(step_seconds[:2]) if step < plan.steps else 0.0)
        elapsed = time.perf_counter() - t_train
        if step % args.log_every == 0 or step == plan.total or step == start + 1:
            log(f"step {step:5d} {'qat ' if qat else ''}loss {float(loss):.4f}  ({elapsed:.0f}s, "
                f"{time.process_time() - cpu0:.0f}s CPU)")
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < plan.total:
            checkpoint(step)
        if args.stop_after and step - start >= args.stop_after and step < plan.total:
            checkpoint(step)
            log(f"stopped after {args.stop_after} steps at step {step}; continue with --resume")
            return None
        if args.max_train_seconds and seconds_before + elapsed > args.max_train_seconds and step < plan.total:
            plan.out_of_time(step)
    if not float_written:  # no QAT phase: the float model is the final one
        write_model_dir(args.float_out, nnx.merge(graphdef, state), args.tokenizer, generation_config(cfg, tokenizer))
        float_written = True
    checkpoint(step)
    log(f"QAT model: INT4 fake-quant eval loss {evaluate(True):.4f}; trained {step - start} steps in "
        f"{time.perf_counter() - t_train:.0f}s")
    return cfg, tokenizer, nnx.merge(graphdef, state), seconds_before + time.perf_counter() - t_train, plan


# A time budget re-plans after FIT_AFTER timed steps (the first ones include compiles), then every
# REFIT_EVERY steps at the median pace of the last RATE_WINDOW.
FIT_AFTER, REFIT_EVERY, RATE_WINDOW = 30, 20, 20


class Plan:
    """How many float and QAT steps, and the learning rate at each: linear warm-up over the first
    tenth (at most 300 steps), cosine decay to 5% at the end, QAT continuing the same curve."""

    def __init__(self, steps: int, qat_steps: int, lr: float):
        self.steps, self.qat_steps, self.lr = steps, qat_steps, lr
        self.planned = (steps, qat_steps)

    @property
    def total(self) -> int:
        return self.steps + self.qat_steps

    def lr_at(self, step: int) -> float:
        warmup = max(1, min(300, self.total // 10))
        if step < warmup:
            return self.lr * step / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup))
        return self.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress)))

    def fit(self, step: int, seconds_left: float, rate: float, compile_allowance: float = 0.0) -> None:
        """Size the rest of the run to `seconds_left` at `rate` seconds a step (less the QAT
        phase's compile still to come): both phases alike while in the float phase, the QAT phase
        alone once in it; never past the steps first planned, never before `step`."""
        fits = step + int(max(0.0, seconds_left - compile_allowance) / rate)
        limit = min(fits, sum(self.planned))
        before = (self.steps, self.qat_steps)
        if step >= self.steps:
            self.qat_steps = max(step - self.steps, limit - self.steps)
        else:
            self.qat_steps = max(1, round(self.planned[1] * limit / sum(self.planned))) if self.planned[1] else 0
            self.steps = limit - self.qat_steps
            if self.steps < step:  # the float phase ends now; QAT gets what is left (one step at least)
                self.steps, self.qat_steps = step, max(1, limit - step) if self.planned[1] else 0
        if (self.steps, self.qat_steps) != before:
            log(f"time budget: {rate * 1e3:.0f} ms/step at step {step}; plan now {self.steps} float + "
                f"{self.qat_steps} QAT steps")

    def out_of_time(self, step: int) -> None:
        """Past the budget anyway: end the float phase now (QAT still runs), or end QAT now."""
        if step < self.steps:
            log(f"time limit at step {step}: moving on to the QAT phase")
            self.steps = step
        else:
            log(f"time limit at step {step}: stopping")
            self.qat_steps = step - self.steps


# ---- export -----------------------------------------------------------------------------------

def generation_config(cfg, tokenizer) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(tokenizer.stop_ids), "do_sample": False,
            "max_new_tokens": 256}


def write_model_dir(out, model, tokenizer_dir, gen):
    from kimi_jax import export
    from kimi_jax.chat import ChatTemplate

    if os.path.isdir(out):
        shutil.rmtree(out)
    # Shards of at most 15 MiB: small enough to come back from a lent GPU machine file by file.
    export.write_checkpoint(out, model.cfg, export.iter_hf_tensors(model), generation_config=gen,
                            max_shard_bytes=15 << 20)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(ChatTemplate.default().source)


def as_device(batch: dict) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in batch.items()}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="out/agent_data")
    ap.add_argument("--tokenizer", default="out/nano_tokenizer")
    ap.add_argument("--out", default="out/kimi-k2-nano", help="the INT4 QAT checkpoint (official layout)")
    ap.add_argument("--float-out", default="out/nano_float", help="float weights before QAT (bf16 and PTQ rows)")
    ap.add_argument("--cache", default="out/nano_cache", help="tokenized-data cache directory")
    ap.add_argument("--train-state", default="out/nano_train_state", help="resumable checkpoint directory")
    ap.add_argument("--resume", action="store_true", help="continue from --train-state if it holds a checkpoint")
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--stop-after", type=int, default=0,
                    help="train this many steps, checkpoint and exit (a long CPU run in pieces; then --resume)")
    ap.add_argument("--max-train-seconds", type=float, default=0,
                    help="shrink the plan to fit this many seconds of training, across resumes (keeping the QAT phase)")
    ap.add_argument("--size", choices=tuple(MODEL_SIZES), default="small")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="packed rows per step")
    ap.add_argument("--row-len", type=int, default=512,
                    help="tokens per packed row; a sample longer than this (after the shared prefix) is dropped")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="micro-batches per step (same update, 1/N of the activation memory)")
    ap.add_argument("--lr", type=float, default=2.5e-3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes that tokenize the data")
    ap.add_argument("--eval-set", default="heldout.jsonl", help="file under --data for the eval loss")
    ap.add_argument("--log-every", type=int, default=10)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from kimi_jax.export import quantize_experts

    trained = train(args)
    if trained is None:  # --stop-after: the run continues later
        return 0
    cfg, tokenizer, model, seconds, plan = trained
    write_model_dir(args.out, quantize_experts(model, args.group_size), args.tokenizer, generation_config(cfg, tokenizer))
    with open(os.path.join(args.out, "training.json"), "w", encoding="utf-8") as f:
        json.dump({"command": "python scripts/train_nano.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "args": vars(args), "train_seconds": round(seconds, 1),
                   "steps_planned": list(plan.planned), "steps_run": [plan.steps, plan.qat_steps],
                   "config": dataclasses.asdict(cfg)}, f, indent=2, default=str)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    log(f"wrote {args.out} ({size / 1e6:.1f} MB) and {args.float_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
