"""How a request picks its tokens and when it stops: `SamplingParams`, the per-slot arrays the
compiled steps take (`knob_arrays`), and a checkpoint's defaults. Host-side and free of JAX (the
scheduler uses it); drawing tokens on the device is draw.py.

The knobs are per-slot arrays inside the compiled steps, so changing them never recompiles and a
server can mix requests with different settings in one batch.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from kimi_jax.errors import KimiError

MAX_STOP_IDS = 12
# Halt ids a slot holds on the device: its stop ids and the few ids where its constraint (if any)
# needs the host back.
HALT_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (values are checked on creation)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise KimiError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise KimiError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise KimiError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KimiError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if len(self.stop_ids) > MAX_STOP_IDS:
            raise KimiError(f"at most {MAX_STOP_IDS} stop token ids, got {len(self.stop_ids)}")





def knob_arrays(params: list[SamplingParams], halts: list[tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Per-slot settings as the compiled steps take them. `halts[i]`: the ids at which slot i's
    row stops on the device (default: its stop ids), -1 padded to HALT_WIDTH."""
    halts = halts if halts is not None else [p.stop_ids for p in params]
    halt = np.full((len(params), HALT_WIDTH), -1, np.int32)
    for i, ids in enumerate(halts):
        if len(ids) > HALT_WIDTH:
            raise KimiError(f"at most {HALT_WIDTH} halt ids per request (stop ids and constraint boundaries), "
                            f"got {len(ids)}")
        halt[i, :len(ids)] = ids
    return {
        "temperature": np.asarray([p.temperature for p in params], np.float32),
        "top_k": np.asarray([p.top_k for p in params], np.int32),
        "top_p": np.asarray([p.top_p for p in params], np.float32),
        "seed": np.asarray([p.seed % 2**32 for p in params], np.uint32),
        "halt": halt,
    }


def checkpoint_defaults(checkpoint: str) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (greedy when absent): keys
    temperature, top_p, top_k, max_new_tokens, each only when the file sets it."""
    path = os.path.join(checkpoint, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    elif isinstance(gen.get("temperature"), (int, float)):
        out["temperature"] = float(gen["temperature"])
    for key in ("top_p", "top_k", "max_new_tokens"):
        if isinstance(gen.get(key), (int, float)):
            out[key] = gen[key]
    return out
