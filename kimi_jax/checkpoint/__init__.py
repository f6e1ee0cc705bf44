"""Hugging Face K2 checkpoint directories (config.json + safetensors shards), one concern a file:

    tensor_table.py       which official tensor(s) hold each model parameter, their shapes and dtypes
    safetensors_file.py   one .safetensors file: its header checked, tensors or blocks copied out
    reader.py             a directory of shards opened through its index
    validation.py         the whole checkpoint checked against the model before anything is read
    host_memory.py        fresh, aligned host buffers for the blocks, on the cheaper page size
    loader.py             the threaded loader: each device's blocks read once, straight to the devices
    expert_repacking.py   INT4 experts repacked on the devices into the packing their kernels read

Writing a checkpoint is kimi_jax/export.py's, through the same tensor table.
"""

from kimi_jax.checkpoint.loader import load_model, load_state
from kimi_jax.checkpoint.reader import CheckpointReader

__all__ = ["CheckpointReader", "load_model", "load_state"]
