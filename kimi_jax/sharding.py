"""Logical-axis sharding rules: which mesh axis splits which named dimension.

Every parameter names its dimensions (layers.py `axes`); activations are named at the few places
that matter. The mesh has three axes:
  data    — batch rows (independent sequences)
  expert  — routed experts (expert parallelism)
  tensor  — attention heads and MLP hidden units (tensor parallelism)
A rule table maps logical names to mesh axes; a dimension whose name is not in the table, or whose
mesh axis has size 1, is replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kimi_jax.errors import KimiError

MESH_AXES = ("data", "expert", "tensor")

DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "experts": "expert",
    "expert_mlp": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "cache_pages": "data",  # each data shard's slots draw pages from its own part of the pool
    # replicated: embed, head_dim, q_lora, kv_lora, experts_logits
}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The size of each mesh axis; their product is the number of devices."""

    data: int = 1
    expert: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        """Devices the mesh spans."""
        return self.data * self.expert * self.tensor

    @classmethod
    def parse(cls, text: str) -> "MeshSpec":
        """'data=1,expert=4,tensor=2' (omitted axes are 1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or name not in MESH_AXES:
                raise KimiError(f"--mesh: '{part}' is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
            if name in sizes:
                raise KimiError(f"--mesh: axis '{name}' given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise KimiError(f"--mesh: size of '{name}' must be an integer, got '{value}'") from None
            if sizes[name] < 1:
                raise KimiError(f"--mesh: size of '{name}' must be >= 1")
        return cls(**sizes)

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)


def make_mesh(spec: MeshSpec, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if spec.size != len(devices):
        raise KimiError(f"mesh {spec} needs {spec.size} devices, but {len(devices)} are available")
    arr = np.asarray(devices).reshape(spec.data, spec.expert, spec.tensor)
    return Mesh(arr, MESH_AXES)


def platform_of(mesh: Mesh | None) -> str:
    """The platform ("cpu", "gpu", "tpu") of a mesh's devices; without one, JAX's default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def spec_for(axes, shape, mesh: Mesh | None, rules: Mapping[str, str | None] = DEFAULT_RULES,
             *, name: str = "array") -> P:
    """PartitionSpec for a value whose dims are named `axes`; checks each split divides its dim."""
    if mesh is None:
        return P()
    used = set()
    out = []
    for dim, logical in zip(shape, axes):
        mesh_axis = rules.get(logical) if logical else None
        if mesh_axis is None or mesh.shape[mesh_axis] == 1:
            out.append(None)
            continue
        if mesh_axis in used:
            raise KimiError(f"{name}: two dimensions map to mesh axis '{mesh_axis}'")
        if dim % mesh.shape[mesh_axis]:
            raise KimiError(
                f"{name}: dimension '{logical}' of size {dim} is not divisible by mesh axis "
                f"'{mesh_axis}' of size {mesh.shape[mesh_axis]}"
            )
        used.add(mesh_axis)
        out.append(mesh_axis)
    return P(*out)


def sharding_for(axes, shape, mesh: Mesh | None, rules=DEFAULT_RULES, *, name="array"):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules, name=name))


def param_axes(var) -> tuple:
    """Logical axes of a parameter: one name (or None) per dimension, as its module declared them."""
    return tuple(var.get_metadata().get("axes", ()))


def placed_abstract(state, mesh: Mesh | None, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """An abstract model state whose leaves are ShapeDtypeStructs carrying their target sharding."""
    from flax import nnx

    flat = []
    for path, var in nnx.to_flat_state(state):
        def place(x, axes=param_axes(var), name="/".join(map(str, path))):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(axes, x.shape, mesh, rules, name=name))

        flat.append((path, var.replace(jax.tree.map(place, var.get_value()))))
    return nnx.from_flat_state(flat)


def default_mesh_spec(cfg, n_devices: int) -> MeshSpec:
    """Use every local device: experts across as many devices as divide the expert count, the
    rest as tensor parallelism over heads."""
    expert = math.gcd(n_devices, cfg.n_routed_experts) if cfg.n_moe_layers else 1
    rest = n_devices // expert
    tensor = math.gcd(rest, cfg.num_attention_heads)
    return MeshSpec(data=rest // tensor, expert=expert, tensor=tensor)


def mesh_candidates(cfg, n_devices: int, batch: int = 1) -> list[MeshSpec]:
    """Every (data, expert, tensor) split of n_devices that could shard this config: data divides
    the batch, expert the routed experts, tensor the heads. Finer checks (every sharded dimension
    divisible) happen when weights are placed."""
    out = []
    for data in range(1, n_devices + 1):
        if n_devices % data or batch % data:
            continue
        for expert in range(1, n_devices // data + 1):
            if (n_devices // data) % expert or (expert > 1 and (not cfg.n_moe_layers or cfg.n_routed_experts % expert)):
                continue
            tensor = n_devices // (data * expert)
            if cfg.num_attention_heads % tensor == 0:
                out.append(MeshSpec(data, expert, tensor))
    return out
