"""Keep JAX from probing for a TPU on a Linux machine that has no accelerator at all.

With libtpu installed (`pip install 'jax[tpu]'`, which the planner's TPU targets and the test extra
use), JAX tries the TPU backend whenever the user has not chosen platforms. On a machine without a
TPU that attempt fails, as it should, but libtpu first writes a block of warnings to stderr ("could
not determine TPU accelerator type", "Logging before InitGoogle()", an INVALID_ARGUMENT about
worker hostnames) that looks like an error in every run of the CLI, the server and the notebook.

When no TPU, NVIDIA or AMD device is visible, CPU is the only backend JAX could pick anyway, so
pinning JAX to it changes nothing but the noise. Anything else is left alone: a chosen
`JAX_PLATFORMS` (even empty, which asks JAX to probe everything), a machine with an accelerator
(where a failing backend is a real error the user must see), or no libtpu to make noise.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# TPU chips are PCI devices of Google's vendor id (older ones also /dev/accel*); GPUs show up as
# these device nodes.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _accelerator_visible() -> bool:
    if any(os.path.exists(node) for node in _GPU_NODES) or glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def skip_absent_tpu() -> bool:
    """Pin JAX to the CPU when that is the only backend this machine has and libtpu would probe
    for a TPU; returns whether it did. Call before JAX starts its backends (importing JAX is fine)."""
    if not sys.platform.startswith("linux") or "JAX_PLATFORMS" in os.environ or os.environ.get("JAX_FORCE_TPU_INIT"):
        return False
    if importlib.util.find_spec("libtpu") is None or _accelerator_visible():
        return False
    jax = sys.modules.get("jax")
    if jax is None:
        os.environ["JAX_PLATFORMS"] = "cpu"  # read when JAX is imported
    elif jax.config.jax_platforms:
        return False  # chosen in code before kimi_jax was imported
    else:
        jax.config.update("jax_platforms", "cpu")
    return True
