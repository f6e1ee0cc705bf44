"""Train the copy model: a small K2-architecture checkpoint that continues repeated and partly
repeated text, the kind of model speculative decoding's benchmarks need (scripts/bench_speculate.py).

The bundled nano model was trained on agent conversations and drifts into its own phrases when it
should copy; a random model copies nothing. This one learns induction on sequences that repeat
earlier spans of themselves, exactly or with edits (a token changed, inserted or dropped), from far
back or near, made of JSON records, code-like lines, pseudo-words and random tokens, all in the
nano model's tokenizer. It is not a chat model: use it raw (token ids or text in, continuation out).

    PYTHONPATH=. nice -n 10 python scripts/train_copy_model.py      # 1,500 steps, ~18 min on a shared 2-core CPU
    PYTHONPATH=. nice -n 10 python scripts/train_copy_model.py --resume scripts/copy_model --out DIR --short-steps 0
    # -> scripts/copy_model/  (config.json, bf16 safetensors, tokenizer files, training.json: 3 MB)

Two layers (one dense, one MoE with 4 routed experts and a shared one) at hidden size 128 can copy:
one attention layer finds the token before each position, the next matches it (an induction head).

Status (2026-12-06): it does not copy yet. Induction forms late in small models (a long plateau
first). A run of 1,500 steps and 650 more from it (--resume; about 28 minutes here) learned JSON and
code syntax but no copying: on the third of three JSON records that differ in one field, its next
token was right 62% of the time teacher-forced (after 1,900 steps), nearly all punctuation, and on
copies of random tokens, what the log's copy accuracy scores and the number to watch, 0.1%.
Speculative decoding's copy benchmark needs a checkpoint that copies (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "copy_model")
TOKENIZER = os.path.join(ROOT, "checkpoints", "kimi-k2-nano")


def copy_config(tokenizer, max_len: int):
    from kimi_jax.config import Config

    return Config(
        vocab_size=tokenizer.n_vocab, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, num_attention_heads=4, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=max_len, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.im_end_id, pad_token_id=tokenizer.token_id("[PAD]"), quantization=None)


# ---- data -------------------------------------------------------------------------------------------

def _word(rng) -> str:
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    return "".join(rng.choice(list(consonants if i % 2 == 0 else vowels)) for i in range(int(rng.integers(2, 8))))


def snippet_text(rng) -> str:
    """A piece of text of one of the shapes agents copy: JSON, code, prose-like words, a table."""
    kind = int(rng.integers(4))
    if kind == 0:
        fields = {_word(rng): (int(rng.integers(0, 10000)) if rng.random() < 0.4 else _word(rng))
                  for _ in range(int(rng.integers(2, 8)))}
        return json.dumps(fields) + "\n"
    if kind == 1:
        name, arg = _word(rng), _word(rng)
        body = [f"    {_word(rng)} = {arg}.{_word(rng)}({int(rng.integers(100))})" for _ in range(int(rng.integers(1, 6)))]
        return f"def {name}({arg}):\n" + "\n".join(body) + f"\n    return {_word(rng)}\n"
    if kind == 2:
        return " ".join(_word(rng) for _ in range(int(rng.integers(5, 30)))) + ".\n"
    return "\n".join(f"| {_word(rng)} | {int(rng.integers(1000))} | {_word(rng)} |" for _ in range(int(rng.integers(2, 6)))) + "\n"


class CopyData:
    """Sequences of `length` tokens in which spans repeat earlier spans (see the module doc)."""

    def __init__(self, tokenizer, seed: int, n_snippets: int = 4000):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.snippets = [np.asarray(tokenizer.encode(snippet_text(rng)), np.int32) for _ in range(n_snippets)]
        self.n_text = 3840  # ordinary tokens: the ids below the special ones

    def fresh(self, n: int) -> np.ndarray:
        """n tokens of new material: snippets, or random tokens."""
        rng = self.rng
        if rng.random() < 0.25:
            return rng.integers(0, self.n_text, n).astype(np.int32)
        parts, total = [], 0
        while total < n:
            parts.append(self.snippets[int(rng.integers(len(self.snippets)))])
            total += len(parts[-1])
        return np.concatenate(parts)[:n]

    def edited(self, span: np.ndarray) -> np.ndarray:
        """A copy of `span` with a few edits, or exact."""
        rng = self.rng
        rate = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.005, 0.05))
        out = []
        for t in span:
            u = rng.random()
            if u < rate / 3:
                out.append(int(rng.integers(self.n_text)))  # changed
            elif u < 2 * rate / 3:
                continue  # dropped
            elif u < rate:
                out += [int(t), int(rng.integers(self.n_text))]  # inserted after
            else:
                out.append(int(t))
        return np.asarray(out, np.int32)

    def sequence(self, length: int) -> np.ndarray:
        rng = self.rng
        if rng.random() < 0.7:  # one span, repeated (with edits) to the end: copying all the way
            span = self.fresh(int(rng.integers(12, length // 2)))
            seq = list(span)
            while len(seq) < length:
                seq += list(self.edited(span))
            return np.asarray(seq[:length], np.int32)
        seq = list(self.fresh(int(rng.integers(16, length // 3))))
        while len(seq) < length:
            if rng.random() < 0.75:
                n = int(rng.integers(8, min(len(seq), length // 2) + 1))
                start = int(rng.integers(0, len(seq) - n + 1))
                seq += list(self.edited(np.asarray(seq[start:start + n])))
            else:
                seq += list(self.fresh(int(rng.integers(8, 120))))
        return np.asarray(seq[:length], np.int32)

    def batch(self, size: int, length: int) -> np.ndarray:
        return np.stack([self.sequence(length) for _ in range(size)])

    def repeats(self, size: int, length: int) -> np.ndarray:
        """Random tokens followed by an exact copy of them, what copy_accuracy scores: nothing but
        copying predicts the second half (snippets would also reward knowing their syntax)."""
        halves = [self.rng.integers(0, self.n_text, length // 2).astype(np.int32) for _ in range(size)]
        return np.stack([np.concatenate([h, h]) for h in halves])


def copy_accuracy(predicted: np.ndarray, repeats: np.ndarray) -> float:
    """How often the model's next token is right in the second, copied half of `repeats` (the first
    token of the copy is left out: nothing says where the copy starts)."""
    half = repeats.shape[1] // 2
    return float(np.mean(predicted[:, half:-1] == repeats[:, half + 1:]))


# ---- training ---------------------------------------------------------------------------------------

def copy_friendly_init(model, seed: int) -> None:
    """Two changes to the random init meant to shorten the plateau before induction forms:
    lm_head starts as the (row-normalized) embedding, so "copy this token's vector" reads out as
    that token for every token alike, instead of a map each token must learn on its own; and every
    embedding shares one constant component, a direction a previous-token head can build its
    position-only query and key from (the model has no biases). In a trial on copies of random
    tokens with fixed and with varying periods the loss fell sooner with them; induction had not
    formed after 300 steps either way."""
    import jax
    import jax.numpy as jnp

    e = model.embed[...]
    norms = jnp.linalg.norm(e, axis=1, keepdims=True)
    model.lm_head.value = e / norms
    u = jax.random.normal(jax.random.key(seed + 1), (e.shape[1],), e.dtype)
    model.embed.value = e + jnp.mean(norms) * u / jnp.linalg.norm(u)


def train(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kimi_jax.chat import Tokenizer
    from kimi_jax.model import KimiK2

    tokenizer = Tokenizer.from_dir(args.tokenizer)
    if args.resume:  # go on training a checkpoint this script wrote (a fresh optimizer)
        from kimi_jax.checkpoint import load_model

        model, _ = load_model(args.resume, dtype=jnp.float32, progress=False)
    else:
        model = KimiK2(copy_config(tokenizer, args.max_len), dtype=jnp.float32, rngs=nnx.Rngs(params=args.seed))
        copy_friendly_init(model, args.seed)
    graphdef, state = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 4), args.steps, args.lr / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.01))
    opt_state = optimizer.init(state)

    def loss_fn(state, tokens):
        logits = nnx.merge(graphdef, state).forward_no_cache(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(state, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    @jax.jit
    def predictions(state, tokens):
        return jnp.argmax(nnx.merge(graphdef, state).forward_no_cache(tokens), -1)

    data = CopyData(tokenizer, args.seed)
    held_out = CopyData(tokenizer, args.seed + 1, n_snippets=200).repeats(8, args.seq_len)
    t0, losses = time.perf_counter(), []
    for i in range(1, args.steps + 1):
        # Short sequences first: an induction head forms sooner among few candidates, and each
        # step holds as many tokens; then the full length, so copies may come from far back.
        length = args.short_len if i <= args.short_steps else args.seq_len
        tokens = data.batch(args.batch * args.seq_len // length, length)
        state, opt_state, loss = step(state, opt_state, jnp.asarray(tokens))
        losses.append(float(loss))
        if i % args.log_every == 0:
            accuracy = copy_accuracy(np.asarray(predictions(state, jnp.asarray(held_out))), held_out)
            print(f"step {i}: loss {np.mean(losses[-args.log_every:]):.3f}, copy accuracy {accuracy:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        if i == args.steps or (args.save_every and i % args.save_every == 0):
            write_checkpoint(args.out, nnx.merge(graphdef, state), args, time.perf_counter() - t0,
                             float(np.mean(losses[-args.log_every:])), i)


def write_checkpoint(out: str, model, args, seconds: float, final_loss: float, steps: int) -> None:
    from kimi_jax import export
    from kimi_jax.checkpoint import iter_hf_tensors

    earlier = None  # the run a --resume went on from, kept in training.json
    if args.resume and os.path.exists(os.path.join(args.resume, "training.json")):
        with open(os.path.join(args.resume, "training.json"), encoding="utf-8") as f:
            earlier = json.load(f)
    if os.path.isdir(out):
        shutil.rmtree(out)
    gen = {"bos_token_id": model.cfg.bos_token_id, "do_sample": False, "max_new_tokens": 256}
    export.write_checkpoint(out, model.cfg, iter_hf_tensors(model), generation_config=gen)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy2(os.path.join(args.tokenizer, name), os.path.join(out, name))
    with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:
        json.dump({"command": "python scripts/train_copy_model.py " + " ".join(sys.argv[1:]), "args": vars(args),
                   "steps_done": steps, "train_seconds": round(seconds, 1), "final_loss": round(final_loss, 4),
                   "resumed_from": earlier},
                  f, indent=2)
    print(f"wrote {out} after {steps} steps, {seconds:.0f}s, loss {final_loss:.3f}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--resume", help="a checkpoint of this script to go on training (default: a fresh model)")
    p.add_argument("--tokenizer", default=TOKENIZER, help="a directory with tiktoken.model (default: the nano model's)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--short-len", type=int, default=64, help="sequence length of the first --short-steps steps")
    p.add_argument("--short-steps", type=int, default=600)
    p.add_argument("--max-len", type=int, default=4096, help="the checkpoint's max_position_embeddings")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every N steps")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
