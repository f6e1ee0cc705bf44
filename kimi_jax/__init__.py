"""kimi_jax: Kimi K2 Thinking in JAX/XLA.

The public API is the names in `__all__` (documented in docs/api.md):

    model = kimi_jax.load(kimi_jax.DEFAULT_CHECKPOINT)     # a Flax NNX module, config in model.cfg
    logits = model.forward_no_cache(tokens)                # [b, t] ids -> [b, t, vocab] float32
    choices = kimi_jax.router_choices(model, tokens)       # the experts each MoE layer picked
    rt = kimi_jax.Runtime.load(kimi_jax.DEFAULT_CHECKPOINT) # model + engine + tokenizer + template
    kimi_jax.Conversation(rt, tools=kimi_jax.builtin_tools()).send("What is 17 * 23?")

The top level is lazy: `import kimi_jax` imports no JAX until a name is used, so `import kimi_jax.chat`
(tokenizer, template, parser) stays free of JAX. Importing it does pin JAX to the CPU on a machine
with no accelerator but libtpu installed, so that JAX's TPU probe does not fill the terminal with
libtpu's warnings (kimi_jax/tpu_probe.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kimi_jax.tpu_probe import skip_absent_tpu

skip_absent_tpu()  # before anything starts JAX's backends: every entry point imports this package first

_EXPORTS = {
    # the model as a Flax module
    "Config": "kimi_jax.config",
    "KimiK2": "kimi_jax.model",
    "Int4Weight": "kimi_jax.quant",
    "load": "kimi_jax.loading",
    "random_model": "kimi_jax.loading",
    "DEFAULT_CHECKPOINT": "kimi_jax.runtime",
    "RouterChoices": "kimi_jax.router_trace",
    "router_choices": "kimi_jax.router_trace",
    # devices
    "MeshSpec": "kimi_jax.sharding",
    "device_mesh": "kimi_jax.loading",
    "shard": "kimi_jax.loading",
    # generation and the agent loop
    "Runtime": "kimi_jax.runtime",
    "BatchEngine": "kimi_jax.engine",
    "Request": "kimi_jax.engine",
    "SamplingParams": "kimi_jax.sampling",
    "Conversation": "kimi_jax.agent",
    "TurnResult": "kimi_jax.agent",
    "ToolRegistry": "kimi_jax.tools",
    "builtin_tools": "kimi_jax.tools",
    "KimiError": "kimi_jax.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names load on first use
    from kimi_jax.agent import Conversation, TurnResult  # noqa: F401
    from kimi_jax.config import Config  # noqa: F401
    from kimi_jax.engine import BatchEngine, Request  # noqa: F401
    from kimi_jax.errors import KimiError  # noqa: F401
    from kimi_jax.loading import device_mesh, load, random_model, shard  # noqa: F401
    from kimi_jax.model import KimiK2  # noqa: F401
    from kimi_jax.quant import Int4Weight  # noqa: F401
    from kimi_jax.router_trace import RouterChoices, router_choices  # noqa: F401
    from kimi_jax.runtime import DEFAULT_CHECKPOINT, Runtime  # noqa: F401
    from kimi_jax.sampling import SamplingParams  # noqa: F401
    from kimi_jax.sharding import MeshSpec  # noqa: F401
    from kimi_jax.tools import ToolRegistry, builtin_tools  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'kimi_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
