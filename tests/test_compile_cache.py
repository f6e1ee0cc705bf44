"""The persistent compilation cache: on by default for the Python API as for the CLI, off on request,
and a cache the user configured is theirs. Each case runs in a fresh process, since JAX decides
once per process where compiled programs go."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NANO = ROOT / "checkpoints" / "kimi-k2-nano"


def _python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("KIMI_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_kimi_jax_load_keeps_compiled_programs_unless_told_not_to(tmp_path):
    code = f"""
        import jax, kimi_jax
        model = kimi_jax.load({str(NANO)!r}, progress=False{{}})
        jax.jit(lambda x: x * 2 + 1)(jax.numpy.arange(3))
    """
    _python(code.format(""), KIMI_JAX_COMPILE_CACHE=str(tmp_path / "on"))
    assert _entries(tmp_path / "on")
    _python(code.format(", compile_cache=False"), KIMI_JAX_COMPILE_CACHE=str(tmp_path / "off"))
    assert not (tmp_path / "off").exists()
    _python(code.format(f", compile_cache={str(tmp_path / 'mine')!r}"))
    assert _entries(tmp_path / "mine")


def test_enabling_after_a_first_compile_still_caches_the_next_ones(tmp_path):
    _python("""
        import jax
        from kimi_jax import compile_cache
        jax.jit(lambda x: x + 1)(1)  # JAX decides here, with no cache configured
        compile_cache.enable()
        jax.jit(lambda x: x * 3)(1)
    """, KIMI_JAX_COMPILE_CACHE=str(tmp_path / "late"))
    assert len(_entries(tmp_path / "late")) == 1  # the second program only


def test_a_cache_the_user_configured_is_kept(tmp_path):
    out = _python("""
        from kimi_jax import compile_cache
        print(compile_cache.use(True))
    """, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs"), KIMI_JAX_COMPILE_CACHE=str(tmp_path / "ours"))
    assert out.strip() == str(tmp_path / "theirs")
