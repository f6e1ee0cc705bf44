"""Which mesh to run a model on, for a target: every split of its devices the model's dimensions
allow, the exact weight and cache bytes of each, temporaries where they could change the answer,
and the one that leaves the longest context at the requested batch. Each other mesh gets the
reason it lost.

A mesh whose context could not beat the best so far even with no temporaries at all is not
compiled: its weights and cache alone settle it (compiles are the slow part of a plan).
"""

from __future__ import annotations

import dataclasses
import time

BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass
class MeshPlan:
    memory: object  # planner.memory.MeshMemory
    temporaries: dict | None = None  # {"prefill", "decode", "how", ...}; None: not needed
    fits: dict | None = None  # batch -> longest context (None: no memory size to fit against)
    verdict: str = ""

    @property
    def mesh(self) -> str:
        return self.memory.mesh

    @property
    def temp_bytes(self) -> int:
        return max(self.temporaries["prefill"], self.temporaries["decode"]) if self.temporaries else 0


@dataclasses.dataclass
class Plan:
    target: object  # planner.targets.Target
    config: str
    batch: int
    max_len: int
    chunk: int
    dtype: str
    best: MeshPlan
    meshes: list  # every MeshPlan, best included
    seconds: float
    backend: object  # planner.memory.Backend
    max_positions: int


def plan(cfg, target, *, config_name: str, max_len: int, batch: int, chunk: int, dtype: str,
         mesh_text: str | None = None, layers: str = "scaled", recorded: dict | None = None,
         progress=print) -> Plan:
    """Plan `cfg` on `target` (planner.targets.Target); see the module docstring. `recorded`:
    compiled temporaries by mesh from an earlier plan, used instead of compiling again."""
    from kimi_jax.errors import KimiError
    from kimi_jax.planner import activations, compiled
    from kimi_jax.planner.memory import backend, fits, gb, longest_context, mesh_memory
    from kimi_jax.sharding import MeshSpec, make_mesh, mesh_candidates

    t0 = time.perf_counter()
    be = backend(cfg, target.platform)
    specs = [MeshSpec.parse(mesh_text)] if mesh_text else mesh_candidates(cfg, target.n_devices, batch)
    if mesh_text and specs[0].size != target.n_devices:
        raise KimiError(f"--mesh {mesh_text} spans {specs[0].size} devices; {target.label} has {target.n_devices}")
    if target.devices is not None:
        mesh_devices = target.devices
    else:  # shardings only: fake host devices of the same count (planner.targets.needs_fake_cpus)
        import jax

        mesh_devices = jax.devices("cpu")[:target.n_devices]
    plans, refused = [], []
    for spec in specs:
        try:
            mem = mesh_memory(cfg, make_mesh(spec, mesh_devices), spec, batch=batch, max_len=max_len, dtype=dtype,
                              be=be)
        except KimiError as e:  # a dimension this mesh cannot split
            refused.append(f"mesh {spec}: cannot shard this model ({e})")
            continue
        plans.append(MeshPlan(mem))
    for line in refused:
        progress(line)
    if not plans:
        raise KimiError(f"no mesh of {target.n_devices} devices can shard this model")
    memory = target.memory
    # Most promising first: the longest context with no temporaries, then the fewest weight bytes.
    plans.sort(key=lambda p: (-(longest_context(p.memory, 0, memory, batch) if memory else 0),
                              p.memory.weight_bytes + p.memory.cache_bytes))
    best = None
    for p in plans:
        m = p.memory
        bound = longest_context(m, 0, memory, batch) if memory else None
        if memory and m.weight_bytes >= memory:
            p.verdict = f"weights {gb(m.weight_bytes)} per device exceed the {gb(memory)} available"
            p.fits = {b: 0 for b in BATCHES}
            continue
        if memory and best is not None and bound <= best.fits[batch]:
            p.verdict = (f"at most {bound:,} tokens at batch {batch} even with no temporaries (weights "
                         f"{gb(m.weight_bytes)} per device), not more than {best.mesh}'s {best.fits[batch]:,}")
            continue
        if recorded and p.mesh in recorded and target.devices is not None:
            p.temporaries = dict(recorded[p.mesh])
        elif target.devices is None:
            p.temporaries = activations.modelled(cfg, MeshSpec.parse(p.mesh), batch=batch, chunk=chunk,
                                                 max_len=max_len)
            p.temporaries["how"] = "activation model (planner/activations.py)"
        else:
            progress(f"mesh {p.mesh}: weights {gb(m.weight_bytes)} per device; compiling prefill and decode")
            p.temporaries = compiled.temporaries(cfg, devices=target.devices, mesh_text=p.mesh, max_len=max_len,
                                                 batch=batch, chunk=chunk, dtype=dtype, layers=layers,
                                                 progress=lambda text, mesh=p.mesh: progress(f"  {mesh}: {text}"))
        if memory:
            p.fits = fits(m, p.temp_bytes, memory, sorted({*BATCHES, batch}))
        if best is None or _better(p, best, batch):
            best = p
    if best is None:  # no mesh leaves room for anything: the least weights come closest
        best = min(plans, key=lambda p: p.memory.weight_bytes)
    for p in plans:
        if p is best or p.verdict:
            continue
        if memory and p.fits[batch] == 0:
            p.verdict = (f"weights {gb(p.memory.weight_bytes)} and temporaries {gb(p.temp_bytes)} per device "
                         f"leave no room for a cache at batch {batch}")
        elif memory:
            p.verdict = f"{p.fits[batch]:,} tokens at batch {batch}, fewer than {best.mesh}'s {best.fits[batch]:,}"
        else:
            p.verdict = f"needs more per device than {best.mesh} ({gb(_total(p))} against {gb(_total(best))})"
    best.verdict = best.verdict or "best"
    return Plan(target=target, config=config_name, batch=batch, max_len=max_len, chunk=chunk, dtype=dtype,
                best=best, meshes=plans, seconds=round(time.perf_counter() - t0, 1), backend=be,
                max_positions=cfg.max_position_embeddings)


def _total(p: MeshPlan) -> int:
    return p.memory.weight_bytes + p.memory.cache_bytes + p.temp_bytes


def _better(p: MeshPlan, best: MeshPlan, batch: int) -> bool:
    if p.fits is not None:
        return (p.fits[batch], -p.memory.weight_bytes) > (best.fits[batch], -best.memory.weight_bytes)
    return _total(p) < _total(best)
