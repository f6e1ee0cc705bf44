"""transformers' rotary embedding for a kimi_jax Config, and the same with a correctly rounded power.

transformers evaluates the YaRN frequencies in float32 with torch's float32 power, which on CPU is
accurate to one ulp but not correctly rounded: for K2 it rounds 50000^(10/64) the other way
(docs/k2-format.md §4.3). kimi_jax rounds the power correctly. `correctly_rounded_power` runs
transformers' own formula with that one step changed, an oracle independent of kimi_jax's code.
"""

import contextlib

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding


def hf_rotary(cfg) -> DeepseekV3RotaryEmbedding:
    """transformers' rotary embedding module for `cfg` (its cos/sin repeat the pairs twice)."""
    raw = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "quantization_config")}
    return DeepseekV3RotaryEmbedding(DeepseekV3Config(**raw))


@contextlib.contextmanager
def correctly_rounded_power():
    """Within: `scalar ** float32_tensor` is computed in float64 and rounded once to float32."""
    float32_rpow = torch.Tensor.__rpow__

    def rpow(exponent, base):
        if exponent.dtype != torch.float32:
            return float32_rpow(exponent, base)
        return float32_rpow(exponent.double(), base).float()

    torch.Tensor.__rpow__ = rpow
    try:
        yield
    finally:
        torch.Tensor.__rpow__ = float32_rpow


def correctly_rounded_frequencies(cfg) -> torch.Tensor:
    """transformers' inv_freq for `cfg` with the power correctly rounded."""
    with correctly_rounded_power():
        return hf_rotary(cfg).inv_freq
