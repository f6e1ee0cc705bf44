"""Checking a checkpoint against the model before anything is allocated: every tensor the tensor table
names is present with an accepted dtype and the stored shape, compressed-tensors' `weight_shape`
records agree with config.json, and nothing but routed experts is quantized. For K2 the read that
follows is 594 GB, so a bad file must be named before it starts.
"""

from __future__ import annotations

from kimi_jax.checkpoint.reader import CheckpointReader
from kimi_jax.checkpoint.tensor_table import INT_DTYPES, tensor_table, weight_shape_names
from kimi_jax.config import Config
from kimi_jax.errors import CheckpointError


def validate(reader: CheckpointReader, cfg: Config) -> None:
    """Check every tensor the model needs before anything is allocated."""
    packed = [n for n in reader.weight_map if n.endswith(".weight_packed")]
    if packed and cfg.quantization is None:
        raise CheckpointError(f"{reader.file_of(packed[0])}: tensor '{packed[0]}' is packed int4 but "
                              "config.json has no quantization_config")
    table = tensor_table(cfg)
    for entry in table:
        for name in entry.hf:
            reader.check(name, entry.hf_shape, entry.dtypes)
    if cfg.quantization is not None:
        for name, want in weight_shape_names(cfg).items():
            reader.check(name, (2,), INT_DTYPES)
            got = tuple(int(x) for x in reader.get(name))
            if got != want:
                raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' = {list(got)} disagrees with "
                                      f"config.json, which implies {list(want)}")
        expected = {n for e in table if e.leaf == "packed" for n in e.hf}
        stray = sorted(set(packed) - expected)
        if stray:
            raise CheckpointError(f"{reader.file_of(stray[0])}: tensor '{stray[0]}' is quantized but this runtime "
                                  "only supports quantized routed experts")
