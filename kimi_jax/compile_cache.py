"""JAX's persistent compilation cache, on by default for the command-line tools, the server and the
Python API (`kimi_jax.load`, `Runtime.load`).

Each run compiles the same prefill and decode programs; on a small CPU that is most of a short run.
With the cache on, a second run loads them from disk instead. The directory is per user
(`~/.cache/kimi_jax/xla`, or $XDG_CACHE_HOME), `$KIMI_JAX_COMPILE_CACHE` or a flag overrides it,
`--no-compile-cache` (or `compile_cache=False`) turns it off, and a cache the process already has
(`JAX_COMPILATION_CACHE_DIR`, or the user's own `jax.config` setting) is left as it is.
"""

from __future__ import annotations

import logging
import os

ENV = "KIMI_JAX_COMPILE_CACHE"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(ENV) or os.path.join(base, "kimi_jax", "xla")


def add_arguments(parser) -> None:
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help=f"where compiled programs are kept between runs (default: ${ENV} or {default_dir()})")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")


def from_args(args) -> str | bool:
    """The choice the flags of `add_arguments` make, in the form `use` takes."""
    return False if args.no_compile_cache else (args.compile_cache or True)


def enable(directory: str | None = None) -> str:
    """Turn the cache on and return its directory: `directory`, else the one this process already
    uses, else the per-user default. Works after earlier compiles too (they stay uncached)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if directory is None and current:
        return current
    directory = directory or default_dir()
    if directory == current:
        return current
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Keep every program: even the small ones take seconds to compile on a laptop CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether it uses the cache, at the first compile: let it decide
    # again. The reset logs an INFO line that a server's log does not need.
    jax_log = logging.getLogger(compilation_cache.reset_cache.__module__)
    level = jax_log.level
    jax_log.setLevel(logging.WARNING)
    try:
        compilation_cache.reset_cache()
    finally:
        jax_log.setLevel(level)
    return directory


def use(choice: str | bool | None) -> str | None:
    """`enable` as a `compile_cache=` argument asks: True for the default, a directory, or
    False/None for no cache. Returns the directory in use, if any."""
    if choice is None or choice is False:
        return None
    return enable(None if choice is True else os.fspath(choice))
