"""JAX's persistent compilation cache for the command-line tools, the server and the notebook.

Each run of `python -m kimi_jax.generate` compiles the same prefill and decode programs; on a small
CPU that is most of a short run. With the cache on, a second run loads them from disk instead. The
directory is per user (`~/.cache/kimi_jax/xla`, or $XDG_CACHE_HOME), `$KIMI_JAX_COMPILE_CACHE` or a
flag overrides it, and `--no-compile-cache` turns it off.
"""

from __future__ import annotations

import os

ENV = "KIMI_JAX_COMPILE_CACHE"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(ENV) or os.path.join(base, "kimi_jax", "xla")


def add_arguments(parser) -> None:
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help=f"where compiled programs are kept between runs (default: ${ENV} or {default_dir()})")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")


def enable(directory: str | None = None) -> str:
    """Turn the cache on (before the first compile) and return its directory."""
    import jax

    directory = directory or default_dir()
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Keep every program: even the small ones take seconds to compile on a laptop CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def enable_from(args) -> str | None:
    """`enable` as the flags of `add_arguments` say."""
    return None if args.no_compile_cache else enable(args.compile_cache)
