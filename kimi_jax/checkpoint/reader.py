"""A Hugging Face checkpoint directory opened for reading: its shards' headers, and tensors copied out.

The directory is sharded with `model.safetensors.index.json` or is one `model.safetensors`.
Opening reads and checks every shard's header (safetensors_file.py); tensor data is only touched
when a tensor, or a block of one, is copied into a buffer the caller owns.
"""

from __future__ import annotations

import json
import os

import numpy as np

from kimi_jax.checkpoint.safetensors_file import SafetensorsFile, TensorInfo
from kimi_jax.errors import CheckpointError


class CheckpointReader:
    """The tensors of a HF checkpoint directory (sharded with an index, or one model.safetensors).

    Opening reads and checks every shard's header; tensor data is only touched by `copy_into`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"{self.dir}: checkpoint directory not found")
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        try:
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({e!s})") from None
            elif os.path.isfile(single):
                self.files["model.safetensors"] = SafetensorsFile(single)
                weight_map = {name: "model.safetensors" for name in self.files["model.safetensors"].tensors}
            else:
                raise CheckpointError(f"{self.dir}: no model.safetensors.index.json or model.safetensors")
            for file in sorted(set(weight_map.values()) - set(self.files)):
                path = os.path.join(self.dir, file)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard listed in the index is missing")
                self.files[file] = SafetensorsFile(path)
        except BaseException:
            self.close()
            raise
        self.weight_map: dict[str, str] = weight_map

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def file_of(self, name: str) -> str:
        return os.path.join(self.dir, self.weight_map[name])

    def info(self, name: str) -> TensorInfo | None:
        """dtype, shape and place of a tensor, or None if its shard does not hold it."""
        return self.files[self.weight_map[name]].tensors.get(name)

    def check(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        info = self.info(name)
        if info is None:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' listed in the index is not in the file")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has dtype {info.dtype}, "
                                  f"expected {' or '.join(dtypes)}")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has shape {list(info.shape)}, "
                                  f"expected {list(shape)}")

    def copy_into(self, name: str, out: np.ndarray, select=None) -> None:
        """Copy tensor `name` (or the view `select` makes of it) into `out`: see SafetensorsFile."""
        self.files[self.weight_map[name]].copy_into(name, out, select)

    def get(self, name: str) -> np.ndarray:
        info = self.info(name)
        out = np.empty(info.shape, info.np_dtype)
        self.copy_into(name, out)
        return out
