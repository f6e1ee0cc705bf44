"""The independent reference: transformers' DeepseekV3ForCausalLM on the same checkpoint directory.

Used by the parity tests and scripts/bench_cpu.py; needs the `test` extra (torch, transformers,
compressed-tensors), which the runtime itself never imports."""

import numpy as np
import torch


def load_reference(directory):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config.from_pretrained(directory)
    # transformers fuses the per-expert tensors only for model_type deepseek_v3; the K2 deploy guide
    # documents this rename as the fallback for engines without a kimi_k2 entry (docs/k2-format.md §1.1).
    config.model_type = "deepseek_v3"
    model = DeepseekV3ForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32).eval()
    # compressed-tensors decompresses INT4 experts into bf16 parameters (dequant in the scale's dtype);
    # upcast everything so the reference computes in fp32 (`.float()` refuses quantized models).
    for param in model.parameters():
        param.data = param.data.float()
    return model


@torch.no_grad()
def reference_logits(model, tokens) -> np.ndarray:
    return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


@torch.no_grad()
def reference_greedy(model, prompt, n) -> list[int]:
    """Greedy continuation by repeated full forwards (independent of any cache implementation)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(reference_logits(model, [seq])[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def reference_prefill_chunked(model, prompt, chunk: int, keep=None):
    """Run `prompt` through the reference `chunk` tokens at a time into a transformers cache, as a
    server prefills a long prompt (the full [t, t] attention mask of a one-shot forward does not fit
    at 100K+ tokens). Returns (the cache, float32 logits [len(keep), vocab] at the prompt positions
    `keep`, default only the last)."""
    from transformers import DynamicCache

    ids = torch.as_tensor(np.asarray(prompt, np.int64))[None]
    t = ids.shape[1]
    keep = np.asarray([t - 1] if keep is None else keep)
    cache = DynamicCache(config=model.config)
    kept = []
    for start in range(0, t, chunk):
        logits = _forward_cached(model, ids[:, start:start + chunk], cache)[0]
        mine = keep[(keep >= start) & (keep < start + logits.shape[0])]
        kept.append(logits[torch.as_tensor(mine - start)].float().numpy())
    return cache, np.concatenate(kept)


@torch.no_grad()
def reference_greedy_cached(model, prompt, n, chunk: int = 2048) -> tuple[list[int], list[float]]:
    """Greedy continuation after a chunked prefill, one cached decode step per token (for prompts
    too long for `reference_greedy`'s full forwards); see `reference_decode_greedy`."""
    cache, logits = reference_prefill_chunked(model, prompt, chunk)
    return reference_decode_greedy(model, cache, logits[-1], n)


@torch.no_grad()
def reference_decode_greedy(model, cache, logits, n) -> tuple[list[int], list[float]]:
    """n greedy tokens from `logits` (the last prompt position's) onward, decoding into `cache`.
    Returns (the tokens, the top-2 logit margin of each step: how far each choice was from a tie
    that rounding could flip)."""
    tokens, margins = [], []
    while True:
        top2 = np.sort(logits)[-2:]
        tokens.append(int(np.argmax(logits)))
        margins.append(float(top2[1] - top2[0]))
        if len(tokens) == n:
            return tokens, margins
        logits = _forward_cached(model, torch.as_tensor([[tokens[-1]]]), cache)[0, -1].float().numpy()


def _forward_cached(model, ids, cache):
    """Logits of `ids` continuing the sequence in `cache` (which grows by them). transformers 5.x
    renames the cache argument from past_key_values to cache."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids=ids, use_cache=True, **{name: cache}).logits
