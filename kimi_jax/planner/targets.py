"""The machines the planner sizes a model for, and where each one's figures come from.

    h100, h200, b200   a host of NVIDIA GPUs (8 unless --devices says otherwise). XLA gets the
                       share of each GPU that JAX's allocator takes: XLA_PYTHON_CLIENT_MEM_FRACTION
                       (0.75 unless set) of the memory the device reports.
    v5p:2x2x2, ...     a TPU topology, compiled for by libtpu's own compiler (no TPU needed), with
                       the whole HBM of each device (by the device kind libtpu reports).
    local              the GPUs or TPUs of this machine, with what XLA says it may use on them.
    cpu                fake host CPU devices (tests); memory only with --hbm-gb.

Temporaries (what the compiled programs need beyond weights and cache) come from a compile for
the target's devices where this machine can do one: libtpu for any TPU topology, XLA:GPU when this
machine has the GPUs. A GPU target planned without them uses the activation model of
planner/activations.py instead; `Target.temporaries` says which.
"""

from __future__ import annotations

import dataclasses
import os

from kimi_jax.errors import KimiError

GIB, MIB = 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class Gpu:
    label: str
    data_sheet: str  # the memory NVIDIA's data sheet gives
    memory: int  # bytes: the total the device reports (nvidia-smi), which JAX's fraction applies to


GPUS = {
    "h100": Gpu("NVIDIA H100", "80 GB", 81559 * MIB),  # H100 SXM, 80 GB HBM3
    "h200": Gpu("NVIDIA H200", "141 GB", 143771 * MIB),  # H200 SXM, 141 GB HBM3e
    "b200": Gpu("NVIDIA B200", "180 GB", 183359 * MIB),  # HGX B200, 180 GB HBM3e per GPU
}
# HBM per TPU device, by the device_kind libtpu reports (a TPU7x chip shows as two devices).
TPU_HBM = {"TPU v4": 32 * GIB, "TPU v5": 95 * GIB, "TPU v5 lite": 16 * GIB, "TPU v6 lite": 32 * GIB,
           "TPU7x": 94.75 * GIB}
# The share of each GPU's memory JAX's allocator gives XLA unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (JAX documentation, "GPU memory allocation"). The rest holds the CUDA context,
# NCCL's buffers and anything else on the GPU.
JAX_GPU_MEMORY_FRACTION = 0.75
GPU_HOST = 8  # GPUs of one host, unless --devices says otherwise
TARGETS_HELP = f"{', '.join(GPUS)}, a TPU topology (v5p:2x2x2, tpu7x:2x2x1, v6e:2x4, ...), local or cpu"


def gpu_memory_fraction() -> float:
    """The share of GPU memory XLA gets in a process started from this environment."""
    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if text is None:
        return JAX_GPU_MEMORY_FRACTION
    try:
        value = float(text)
    except ValueError:
        raise KimiError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r} is not a number") from None
    if not 0 < value <= 1:
        raise KimiError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r} must be in (0, 1]")
    return value


@dataclasses.dataclass
class Target:
    """Devices to plan for. `devices`: the JAX devices to compile for, or None where nothing here
    can compile for them (a GPU target without its GPUs: the activation model stands in)."""

    name: str
    label: str  # "8 x NVIDIA H200"
    platform: str  # "gpu", "tpu" or "cpu"
    n_devices: int
    devices: list | None
    memory: float | None  # bytes per device XLA may use
    memory_note: str  # where `memory` comes from
    temporaries: str  # where the temporaries come from


def uses_host_devices(name: str) -> bool:
    """Whether the target's meshes may be built of fake host CPU devices, whose number JAX fixes
    when it starts (the cpu target; a GPU target planned without its GPUs)."""
    return name in ("cpu", "local", *GPUS)


def resolve(name: str, n_devices: int | None = None, *, hbm_gb: float | None = None,
            gpu_fraction: float | None = None) -> Target:
    """The Target for a --target value; `n_devices` None: the target's own count; `hbm_gb`
    overrides the memory per device; `gpu_fraction` the share of a GPU XLA gets."""
    import jax

    if name in GPUS:
        target = _gpu_host(GPUS[name], name, n_devices or GPU_HOST,
                           gpu_memory_fraction() if gpu_fraction is None else gpu_fraction)
    elif name == "local":
        if jax.default_backend() == "cpu":
            raise KimiError("--target local: this machine has no GPU or TPU; name a target (" + TARGETS_HELP + ")")
        target = _here(jax.devices(), n_devices)
    elif name == "cpu":
        devices = jax.devices("cpu")
        n = n_devices or GPU_HOST
        if len(devices) < n:
            raise KimiError(f"JAX is already running with {len(devices)} host devices; --devices {n} needs a fresh "
                            "process")
        target = Target("cpu", f"{n} x host CPU", "cpu", n, devices[:n], None, "none (give --hbm-gb)",
                        "compiled by XLA:CPU, whose bf16 dots work on float32 copies of the weights: "
                        "far above what a GPU or TPU needs")
    else:
        devices = tpu_topology(name)
        if n_devices not in (None, len(devices)):
            raise KimiError(f"--target {name} has {len(devices)} devices, not --devices {n_devices}")
        kind = devices[0].device_kind
        target = Target(name, f"{len(devices)} x {kind}", "tpu", len(devices), devices,
                        TPU_HBM.get(kind), f"{TPU_HBM[kind] / GIB:g} GiB of HBM per {kind} device" if kind in TPU_HBM
                        else f"unknown for {kind} (give --hbm-gb)", f"compiled by libtpu for {kind}")
    if hbm_gb:
        target.memory, target.memory_note = hbm_gb * 1e9, "--hbm-gb"
    return target


def _gpu_host(gpu: Gpu, name: str, n: int, fraction: float) -> Target:
    here = _local(gpu)
    if len(here) >= n:
        how = f"compiled by XLA:GPU on this machine's {here[0].device_kind}"
    else:
        how = f"activation model: no {n} x {gpu.label} here to compile for (kimi_jax/planner/activations.py)"
    default = "" if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ else ", JAX's default"
    note = (f"{fraction:g} (XLA_PYTHON_CLIENT_MEM_FRACTION{default}) of the {gpu.memory // MIB:,} MiB an "
            f"{gpu.label.split()[-1]} reports ({gpu.data_sheet} on NVIDIA's data sheet)")
    return Target(name, f"{n} x {gpu.label}", "gpu", n, here[:n] if len(here) >= n else None,
                  gpu.memory * fraction, note, how)


def _here(devices, n_devices: int | None) -> Target:
    n = n_devices or len(devices)
    if n > len(devices):
        raise KimiError(f"--devices {n}: this machine has {len(devices)} {devices[0].platform.upper()} devices")
    devices = devices[:n]
    kind, platform = devices[0].device_kind, devices[0].platform
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    compiler = "libtpu" if platform == "tpu" else "XLA:GPU"
    return Target("local", f"{n} x {kind}", platform, n, devices, limit,
                  "what XLA says it may use on this device" if limit else "unknown (give --hbm-gb)",
                  f"compiled by {compiler} on this machine's {kind}")


def _local(gpu: Gpu) -> list:
    """This machine's GPUs of that model (none without a GPU backend)."""
    import jax

    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return []
    return [d for d in devices if gpu.label.split()[-1] in d.device_kind]


def tpu_topology(name: str):
    """Compile-only devices of a TPU topology, described by libtpu (no TPU needed)."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise KimiError(f"--target {name}: not one of {TARGETS_HELP}; a TPU topology needs libtpu's compiler: "
                        "pip install 'jax[tpu]'")
    # Only the compiler runs: it may share libtpu with a process that holds this host's TPU lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # an unknown topology name
        raise KimiError(f"--target {name}: not one of {TARGETS_HELP}, and libtpu cannot describe it as a TPU "
                        f"topology ({str(e).splitlines()[0]})") from None
