"""The MLA latent cache: per token and layer only the normalized latent c_kv (kv_lora_rank values)
and the rotated shared rope key k_pe (qk_rope_head_dim values) — 576 values for K2, 35x less than
per-head K/V (perf-targets.md).

Layout. Every row of a batch writes at the same slot `length`: prompts of different lengths are
right-aligned so that they all end at the same slot, and row b's tokens start at `starts[b]`. A
token's rope position is `slot - starts[b]`. This keeps every cache write a single
`dynamic_update_slice` (in place on a donated buffer) and lets the decode step stay one compiled
program for any mix of prompt lengths. Slots at or beyond `length` may hold garbage from the tail
of a prefill chunk; causal masking never lets a real query see them, and later writes overwrite
them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import Config
from kimi_jax.distributed import global_array
from kimi_jax.sharding import sharding_for

CACHE_AXES = (None, "batch", None, None)  # layers, batch, slots, features


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    c_kv: jax.Array  # [layers, batch, slots, kv_lora_rank]
    k_pe: jax.Array  # [layers, batch, slots, qk_rope_head_dim], rope already applied
    starts: jax.Array  # [batch] int32: first slot holding a real token of each row
    length: jax.Array  # [] int32: next slot to write (same for every row)

    @property
    def slots(self) -> int:
        return self.c_kv.shape[2]

    @property
    def batch(self) -> int:
        return self.c_kv.shape[1]

    @staticmethod
    def slots_for(max_len: int, chunk: int, block: int) -> int:
        """Buffer slots for `max_len` tokens: a prefill chunk may run `chunk - 1` slots past the last
        real token, and attention reads whole key blocks of `block` slots."""
        need = max_len + chunk - 1
        return -(-need // block) * block

    @classmethod
    def create(cls, cfg: Config, starts, slots: int, dtype, mesh=None) -> "LatentCache":
        """An empty cache for rows whose first real slot is `starts[b]`, batch split over the mesh's
        data axis. The arrays are placed (committed) where the compiled steps leave their outputs,
        so the first call and every later one hit the same compiled program."""
        batch = len(starts)
        shape = (cfg.num_hidden_layers, batch, slots)
        rows = sharding_for(CACHE_AXES, shape + (1,), mesh, name="cache")
        scalar = sharding_for((), (), mesh)
        return cls(
            c_kv=_zeros(shape + (cfg.kv_lora_rank,), jnp.dtype(dtype), rows)(),
            k_pe=_zeros(shape + (cfg.qk_rope_head_dim,), jnp.dtype(dtype), rows)(),
            starts=global_array(np.asarray(starts, np.int32), scalar),
            length=global_array(np.int32(0), scalar),
        )

    def truncate(self, n: int) -> "LatentCache":
        """Forget everything from slot n on (slots past `length` are never read)."""
        return dataclasses.replace(self, length=global_array(np.int32(n), self.length.sharding))

    def nbytes_per_token(self) -> int:
        layers = self.c_kv.shape[0]
        return layers * (self.c_kv.shape[-1] + self.k_pe.shape[-1]) * self.c_kv.dtype.itemsize


@functools.lru_cache(maxsize=32)
def _zeros(shape, dtype, sharding):
    """A compiled zeros for `sharding`: creates each device's block in place, on every process of
    a multi-host run (a host array could not be placed on devices of other processes)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def cache_bytes_per_token(cfg: Config, dtype) -> int:
    return cfg.num_hidden_layers * cfg.cache_dim * jnp.dtype(dtype).itemsize
