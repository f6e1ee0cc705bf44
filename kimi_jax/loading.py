"""Getting a `KimiK2` onto devices: from a checkpoint directory of either kind, from a config with
random weights, or by moving a model that exists onto a mesh.

    model = load("checkpoints/kimi-k2-nano")                 # HF layout or converted; one device
    model = load("/models/Kimi-K2-Thinking", mesh="tensor=8")  # each device reads only its shards
    model = random_model(cfg, seed=0, mesh="auto")            # weights drawn where they will live
    model = shard(model, device_mesh(model.cfg))              # an existing model, re-placed

A mesh is a `jax.sharding.Mesh` with the axes ("data", "expert", "tensor"), its sizes as text
("expert=4,tensor=2"; omitted axes are 1, the product must be the number of devices), or "auto":
every local device, experts split first and the rest as tensor parallelism over heads. The
parameters' logical axis names decide where each one goes (sharding.py), so the same call places
the nano model on one CPU and K2 on a TPU slice.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from kimi_jax.config import Config
from kimi_jax.errors import KimiError
from kimi_jax.model import KimiK2, abstract_model
from kimi_jax.sharding import MESH_AXES, MeshSpec, default_mesh_spec, make_mesh, placed_abstract

MODEL_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def model_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """The compute dtype named by `dtype` ("bfloat16", "float32" or the jnp dtypes); INT4 experts
    stay packed whatever it is."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in MODEL_DTYPES:
        raise KimiError(f"dtype must be bfloat16 or float32, got '{dtype}'")
    return jnp.dtype(MODEL_DTYPES[name])


def device_mesh(cfg: Config, spec: MeshSpec | str | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the axes ("data", "expert", "tensor") over `devices` (default: every device).

    `spec` gives the axis sizes ("expert=4,tensor=2" or a `MeshSpec`); None or "auto" picks the
    default for `cfg`: experts over as many devices as divide the expert count, then heads. A spec
    of size 1 ("data=1") is the first device alone; any other spec must use every device."""
    devices = list(jax.devices() if devices is None else devices)
    if spec is None or spec == "auto":
        spec = default_mesh_spec(cfg, len(devices))
    elif isinstance(spec, str):
        spec = MeshSpec.parse(spec)
    if spec.size == 1:  # one device is always available: the first, however many there are
        devices = devices[:1]
    return make_mesh(spec, devices)


def resolve_mesh(mesh: Mesh | MeshSpec | str | None, cfg: Config) -> Mesh | None:
    """The mesh a `mesh=` argument names (see the module docstring); None stays None."""
    if mesh is None:
        return None
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != MESH_AXES:
            raise KimiError(f"mesh axes must be {MESH_AXES} (make one with kimi_jax.device_mesh), "
                            f"got {tuple(mesh.axis_names)}")
        return mesh
    if isinstance(mesh, (str, MeshSpec)):
        return device_mesh(cfg, mesh)
    raise KimiError(f"mesh must be a jax.sharding.Mesh, a MeshSpec, 'auto' or text like 'expert=4,tensor=2', "
                    f"got {type(mesh).__name__}")


def load(directory: str | os.PathLike, *, dtype: str | jnp.dtype = "bfloat16",
         mesh: Mesh | MeshSpec | str | None = None, progress: bool = True,
         compile_cache: str | bool = True) -> KimiK2:
    """Load a K2-architecture checkpoint into a `KimiK2` (its config is `model.cfg`).

    `directory` is a Hugging Face layout directory (config.json + safetensors, INT4 experts as
    compressed-tensors `pack-quantized`) or one written by `python -m kimi_jax.convert`. Every
    tensor's name, dtype and shape is checked before anything is allocated. Without `mesh` the
    weights go to the default device; with one, each device reads only its own blocks.
    `compile_cache`: keep compiled programs on disk for the next run (kimi_jax/compile_cache.py):
    True for the per-user directory, a directory, or False."""
    from kimi_jax import compile_cache as cache

    cache.use(compile_cache)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise KimiError(f"checkpoint directory '{directory}' not found")
    return load_checkpoint(directory, Config.from_hf(directory), dtype=dtype, mesh=mesh, progress=progress)


def load_checkpoint(directory: str, cfg: Config, *, dtype: str | jnp.dtype = "bfloat16",
                    mesh: Mesh | MeshSpec | str | None = None, progress: bool = True) -> KimiK2:
    """`load` for a caller that has read the directory's config.json already (`cfg`), so that a
    load parses it once."""
    from kimi_jax import convert
    from kimi_jax.checkpoint import load_state

    jdtype = model_dtype(dtype)
    placement = resolve_mesh(mesh, cfg)
    if convert.is_converted(directory):
        return convert.load_converted(directory, cfg, dtype=jdtype, mesh=placement)
    return nnx.merge(*load_state(directory, cfg, dtype=jdtype, mesh=placement, progress=progress))


def _shardings(state, mesh: Mesh | None):
    """Where each leaf of a model state goes on `mesh` (None: the default device)."""
    return jax.tree.map(lambda leaf: leaf.sharding, placed_abstract(state, mesh))


def random_model(cfg: Config, *, seed: int = 0, dtype: str | jnp.dtype = "bfloat16",
                 mesh: Mesh | MeshSpec | str | None = None) -> KimiK2:
    """A `KimiK2` with random weights (INT4 experts when `cfg.quantization` says so) from the
    module's own initializers, as `KimiK2(cfg, dtype=dtype, rngs=nnx.Rngs(params=seed))` draws
    them, but in one compiled program that writes each device's blocks in place: a model too big
    for one device never passes through one. The same seed gives the same weights on any mesh;
    the compiled draw may round a value's last bit differently from the eager constructor."""
    graphdef, draw = _random_drawer(cfg, model_dtype(dtype), resolve_mesh(mesh, cfg))
    return nnx.merge(graphdef, draw(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _random_drawer(cfg: Config, dtype, mesh: Mesh | None):
    """(graphdef, compiled key -> state) for `random_model`; kept so a second draw reuses the program."""
    graphdef, abstract = abstract_model(cfg, dtype)

    def draw(key):
        return nnx.state(KimiK2(cfg, dtype=dtype, rngs=nnx.Rngs(params=key)))

    return graphdef, jax.jit(draw, out_shardings=_shardings(abstract, mesh))


def shard(model: KimiK2, mesh: Mesh | MeshSpec | str | None) -> KimiK2:
    """The same model with its parameters placed on `mesh` by their logical axes (None: all on
    the default device). Run it inside `with jax.set_mesh(mesh):` so the MoE layers compute with
    expert parallelism."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, _shardings(state, resolve_mesh(mesh, model.cfg))))
