"""A loaded model ready to serve: config, weights on their devices, engine, tokenizer, template.

`Runtime.load(dir)` accepts a Hugging Face layout directory (config.json + safetensors shards) or a
directory written by `python -m kimi_jax.convert` (orbax), and is what the CLI, the agent loop and
scripts start from.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from kimi_jax.batching import BatchEngine
from kimi_jax.config import Config
from kimi_jax.errors import KimiError

DEFAULT_MAX_LEN = 4096


@dataclasses.dataclass
class Runtime:
    cfg: Config
    model: object
    engine: BatchEngine
    tokenizer: object | None  # kimi_jax.chat.Tokenizer when the checkpoint ships tokenizer files
    template: object | None  # kimi_jax.chat.ChatTemplate when it ships chat_template.jinja
    checkpoint: str
    mesh: object | None = None

    @classmethod
    def load(cls, checkpoint: str, *, dtype="bfloat16", max_len: int | None = None, mesh: str | None = None,
             chunk: int = 128, max_batch: int = 1, page_size: int | None = None, n_pages: int | None = None,
             max_queue: int = 64, progress: bool = True) -> "Runtime":
        """Load weights onto the devices and build the engine: `max_batch` decode slots of up to
        `max_len` tokens each, over a paged cache (`page_size` tokens a page, `n_pages` pages)."""
        from kimi_jax import convert
        from kimi_jax.checkpoint import load_model
        from kimi_jax.sharding import MeshSpec, default_mesh_spec, make_mesh

        if not os.path.isdir(checkpoint):
            raise KimiError(f"checkpoint directory '{checkpoint}' not found")
        cfg = Config.from_hf(checkpoint)
        jdtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(str(dtype))
        if jdtype is None:
            raise KimiError(f"--dtype must be bfloat16 or float32, got '{dtype}'")
        # Every setting is checked before the weights are read: for K2 that read is 594 GB.
        max_len = max_len or min(DEFAULT_MAX_LEN, cfg.max_position_embeddings)
        if max_len < 2:
            raise KimiError(f"--max-len must be >= 2, got {max_len}")
        if max_len > cfg.max_position_embeddings:
            raise KimiError(f"--max-len {max_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
        if max_batch < 1:
            raise KimiError(f"--max-batch must be >= 1, got {max_batch}")
        import jax

        spec = MeshSpec.parse(mesh) if mesh else default_mesh_spec(cfg, jax.device_count())
        device_mesh = make_mesh(spec) if spec.size > 1 else None
        if convert.is_converted(checkpoint):
            model = convert.load_converted(checkpoint, cfg, dtype=jdtype, mesh=device_mesh)
        else:
            model, _ = load_model(checkpoint, dtype=jdtype, mesh=device_mesh, progress=progress)
        tokenizer = template = None
        if os.path.isfile(os.path.join(checkpoint, "tiktoken.model")):
            from kimi_jax.chat import Tokenizer

            tokenizer = Tokenizer.from_dir(checkpoint)
        if os.path.isfile(os.path.join(checkpoint, "chat_template.jinja")):
            from kimi_jax.chat import ChatTemplate

            template = ChatTemplate.from_dir(checkpoint)
        engine = BatchEngine(model, max_batch=max_batch, max_len=max_len, chunk=chunk, mesh=device_mesh,
                             n_pages=n_pages, max_queue=max_queue, **({"page_size": page_size} if page_size else {}))
        return cls(cfg, model, engine, tokenizer, template, checkpoint, device_mesh)

    def stop_ids(self) -> tuple[int, ...]:
        """<|im_end|> and [EOS] from the tokenizer (docs/k2-format.md §8), plus config.json's eos_token_id."""
        ids = set(self.tokenizer.stop_ids) if self.tokenizer is not None else set()
        if self.cfg.eos_token_id is not None:
            ids.add(self.cfg.eos_token_id)
        return tuple(sorted(ids))

    def require_chat(self) -> None:
        if self.tokenizer is None or self.template is None:
            missing = "tiktoken.model" if self.tokenizer is None else "chat_template.jinja"
            raise KimiError(f"{self.checkpoint}: {missing} not found; chat mode needs the tokenizer and chat "
                            "template (use --prompt-ids for a bare checkpoint)")
