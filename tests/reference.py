"""The independent reference: transformers' DeepseekV3ForCausalLM on the same checkpoint directory."""

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
