"""A loaded model ready to serve: config, weights on their devices, engine, tokenizer, template.

`Runtime.load(dir)` accepts a Hugging Face layout directory (config.json + safetensors shards) or a
directory written by `python -m kimi_jax.convert` (orbax), and is what the CLI, the server, the
agent loop and scripts start from; without a directory they start from `DEFAULT_CHECKPOINT`, the
nano model bundled with the repository. Importing this module imports no JAX: the front ends read
their defaults here before they need a device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from kimi_jax.config import Config
from kimi_jax.errors import KimiError
from kimi_jax.scheduler import DEFAULT_CHUNK
from kimi_jax.speculation import DEFAULT_DRAFT_TOKENS, DEFAULT_SPECULATE, check_settings

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from kimi_jax.engine import BatchEngine

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "checkpoints", "kimi-k2-nano")
DEFAULT_MAX_LEN = 4096


@dataclasses.dataclass
class Runtime:
    """Everything needed to chat with a checkpoint: `cfg`, `model`, an `engine` (BatchEngine), the
    checkpoint's `tokenizer` and chat `template` (None when it ships none) and the device `mesh`."""

    cfg: Config
    model: object
    engine: BatchEngine
    tokenizer: object | None  # kimi_jax.chat.Tokenizer when the checkpoint ships tokenizer files
    template: object | None  # kimi_jax.chat.ChatTemplate when it ships chat_template.jinja
    checkpoint: str
    mesh: object | None = None

    @classmethod
    def load(cls, checkpoint: str, *, dtype: str = "bfloat16", max_len: int | None = None, mesh: Mesh | str | None = None,
             chunk: int = DEFAULT_CHUNK, max_batch: int = 1, page_size: int | None = None, n_pages: int | None = None,
             max_queue: int = 64, mirror: bool = False, progress: bool = True,
             compile_cache: str | bool = True, speculate: str = DEFAULT_SPECULATE,
             draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> "Runtime":
        """Load weights onto the devices and build the engine: `max_batch` decode slots of up to
        `max_len` tokens each, over a paged cache (`page_size` tokens a page, `n_pages` pages).
        Compiled programs are kept on disk for the next run unless `compile_cache=False`
        (kimi_jax.load has the same switch). `speculate` ("suffix", "ngram" or "off") and
        `draft_tokens`: speculative decoding (BatchEngine; docs/architecture.md).

        `mesh` is a `jax.sharding.Mesh`, text such as "expert=4,tensor=2", or None for every local
        device (kimi_jax.loading); on a single device the programs run unsharded."""
        from kimi_jax.engine import BatchEngine
        from kimi_jax.loading import load_checkpoint, model_dtype, resolve_mesh

        if not os.path.isdir(checkpoint):
            raise KimiError(f"checkpoint directory '{checkpoint}' not found")
        cfg = Config.from_hf(checkpoint)
        jdtype = model_dtype(dtype)
        # Every setting is checked before the weights are read: for K2 that read is 594 GB.
        max_len = max_len or min(DEFAULT_MAX_LEN, cfg.max_position_embeddings)
        if max_len < 2:
            raise KimiError(f"--max-len must be >= 2, got {max_len}")
        if max_len > cfg.max_position_embeddings:
            raise KimiError(f"--max-len {max_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
        if max_batch < 1:
            raise KimiError(f"--max-batch must be >= 1, got {max_batch}")
        check_settings(speculate, draft_tokens)
        device_mesh = resolve_mesh(mesh or "auto", cfg)
        if device_mesh.size == 1:
            device_mesh = None
        from kimi_jax import compile_cache as cache

        cache.use(compile_cache)
        model = load_checkpoint(checkpoint, cfg, dtype=jdtype, mesh=device_mesh, progress=progress)
        tokenizer = template = None
        if os.path.isfile(os.path.join(checkpoint, "tiktoken.model")):
            from kimi_jax.chat import Tokenizer

            tokenizer = Tokenizer.from_dir(checkpoint)
        if os.path.isfile(os.path.join(checkpoint, "chat_template.jinja")):
            from kimi_jax.chat import ChatTemplate

            template = ChatTemplate.from_dir(checkpoint)
        engine = BatchEngine(model, max_batch=max_batch, max_len=max_len, chunk=chunk, mesh=device_mesh,
                             page_size=page_size, n_pages=n_pages, max_queue=max_queue, mirror=mirror,
                             speculate=speculate, draft_tokens=draft_tokens)
        return cls(cfg, model, engine, tokenizer, template, checkpoint, device_mesh)

    def stop_ids(self) -> tuple[int, ...]:
        """<|im_end|> and [EOS] from the tokenizer (docs/k2-format.md §8), plus config.json's eos_token_id."""
        ids = set(self.tokenizer.stop_ids) if self.tokenizer is not None else set()
        if self.cfg.eos_token_id is not None:
            ids.add(self.cfg.eos_token_id)
        return tuple(sorted(ids))

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt token ids for OpenAI-style `messages` (and `tools` specs) through the checkpoint's
        chat template, ending where the assistant's reply starts. Message text cannot inject
        control tokens: only the template's own markup becomes special tokens."""
        from kimi_jax.chat.prompt import encode_chat

        self.require_chat()
        return encode_chat(self.tokenizer, self.template, messages, tools)

    def require_chat(self) -> None:
        """Raise a KimiError naming the missing file unless this checkpoint can chat."""
        if self.tokenizer is None or self.template is None:
            missing = "tiktoken.model" if self.tokenizer is None else "chat_template.jinja"
            raise KimiError(f"{self.checkpoint}: {missing} not found; chat mode needs the tokenizer and chat "
                            "template (use --prompt-ids for a bare checkpoint)")
