"""kimi_jax: Kimi K2 Thinking in JAX/XLA.

The top level is lazy so that `import kimi_jax.chat` (tokenizer, template, parser) never imports JAX.
"""

import importlib

_EXPORTS = {
    "Config": "kimi_jax.config",
    "KimiError": "kimi_jax.errors",
    "KimiK2": "kimi_jax.model",
    "load_model": "kimi_jax.checkpoint",
    "BatchEngine": "kimi_jax.batching",
    "SamplingParams": "kimi_jax.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kimi_jax' has no attribute {name!r}")
