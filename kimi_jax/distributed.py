"""Several hosts, one program: `jax.distributed` set-up and the few host-side reads that need care.

Every process runs the same generation loop over one global mesh. Arrays that span processes
cannot be read with `np.asarray`; the values the loop reads on the host (sampled tokens, the cache
length) are kept replicated, so each process reads its local copy. Only process 0 prints.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np

from kimi_jax.errors import KimiError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 120) -> bool:
    """Join a multi-process run when a coordinator is given (flags, or KIMI_COORDINATOR_ADDRESS,
    KIMI_NUM_PROCESSES, KIMI_PROCESS_ID). Returns whether this is a multi-process run."""
    coordinator = coordinator or os.environ.get("KIMI_COORDINATOR_ADDRESS")
    if not coordinator:
        return False
    try:
        num_processes = int(num_processes if num_processes is not None else os.environ["KIMI_NUM_PROCESSES"])
        process_id = int(process_id if process_id is not None else os.environ["KIMI_PROCESS_ID"])
    except (KeyError, ValueError):
        raise KimiError("a coordinator needs --num-processes and --process-id (or KIMI_NUM_PROCESSES and "
                        "KIMI_PROCESS_ID)") from None
    if not 0 <= process_id < num_processes:
        raise KimiError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
    if process_id != 0:
        _wait_for(coordinator, timeout_s)
    # Cross-process collectives for CPU devices (tests, CPU clusters); GPUs and TPUs bring their own.
    # Asking for the backend here would initialize it, which must not happen before initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    except Exception as e:  # the runtime raises several kinds; the user needs the address and the cause
        raise KimiError(f"could not join the run at coordinator {coordinator} within {timeout_s}s "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return True


def add_arguments(parser) -> None:
    """The command-line flags of a multi-process run (generate and serve share them)."""
    multi = parser.add_argument_group("several hosts (or KIMI_COORDINATOR_ADDRESS, KIMI_NUM_PROCESSES, "
                                      "KIMI_PROCESS_ID)")
    multi.add_argument("--coordinator", help="HOST:PORT of process 0; every process runs the same command")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    multi.add_argument("--coordinator-timeout", type=int, default=120, help="seconds to wait for all processes")


def initialize_from(args) -> bool:
    """`initialize` with the flags of `add_arguments`."""
    return initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.coordinator_timeout)


def _wait_for(address: str, timeout_s: float) -> None:
    """Wait until the coordinator accepts connections. The XLA client aborts the whole process
    (no Python exception) when it cannot connect, so we find out first, with a readable error."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise KimiError(f"--coordinator must be HOST:PORT, got '{address}'")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise KimiError(f"could not join the run at coordinator {address} within {timeout_s}s "
                                f"({e.strerror or e})") from None
            time.sleep(0.5)


def is_main() -> bool:
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A replicated (or single-process) array's value on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def global_array(value: np.ndarray, sharding) -> jax.Array:
    """Place a host value that every process holds identically onto a (possibly global) sharding."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def broadcast_from_main(obj):
    """Process 0's Python value on every process (each process passes its own; only process 0's
    counts). Values travel pickled, padded to a power-of-two size so a long-running loop compiles
    the broadcast for a few sizes only."""
    import pickle

    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(1 << max(6, (size - 1).bit_length()), np.uint8)
    padded[:data.size] = data
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded))[:size].tobytes())
