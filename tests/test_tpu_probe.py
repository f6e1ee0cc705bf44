"""On a machine without a TPU, libtpu (installed with the test extra) must not fill the user's
terminal with its start-up warnings: not from the CLI, the server or `import kimi_jax`. Real errors
still show, and a platform the user chose is theirs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_jax.tpu_probe import _accelerator_visible

ROOT = Path(__file__).resolve().parent.parent
# Lines of the block libtpu prints when JAX probes for a TPU that is not there.
TPU_NOISE = ("TPU accelerator type", "InitGoogle", "TPU_WORKER_HOSTNAMES", "libtpu", "Unable to initialize backend")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed: no noise to keep out"),
    pytest.mark.skipif(not sys.platform.startswith("linux") or _accelerator_visible(),
                       reason="this machine has an accelerator: JAX must probe it"),
]


def _env(**extra) -> dict:
    """The user's environment: no platform chosen, one CPU device. libtpu lets only one process per
    machine probe at a time (other test workers may hold its lock file); allow this one to."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1", **extra)
    return env


def _run(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(**env), cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(mark in line for mark in TPU_NOISE)]


def test_without_kimi_jax_this_machine_shows_the_block():
    # The control: plain JAX on this machine prints it, so the checks below can fail.
    proc = _run("-c", "import jax; jax.devices()")
    assert proc.returncode == 0 and _noise(proc.stderr), proc.stderr


@pytest.mark.parametrize("code", ["import kimi_jax, jax; print(jax.devices())",
                                  "import jax, kimi_jax; print(jax.devices())"])
def test_import_kimi_jax_keeps_stderr_clean_whichever_is_imported_first(code):
    proc = _run("-c", code)
    assert proc.returncode == 0 and "CpuDevice" in proc.stdout
    assert not _noise(proc.stderr), proc.stderr


@pytest.mark.parametrize("module", ["kimi_jax.generate", "kimi_jax.serve"])
def test_the_cli_and_the_server_print_only_their_own_error(module):
    # A mesh this machine cannot hold fails right after JAX has started its backends.
    prompt = ["--prompt-ids", "1"] if module == "kimi_jax.generate" else []
    proc = _run("-m", module, "--mesh", "data=3", "--no-compile-cache", *prompt)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: mesh data=3")
    assert not _noise(proc.stderr), proc.stderr


def test_a_platform_the_user_chose_is_kept_and_its_failure_shown():
    proc = _run("-c", "import kimi_jax, jax; jax.devices()", JAX_PLATFORMS="tpu")
    assert proc.returncode != 0 and "Unable to initialize backend 'tpu'" in proc.stderr
