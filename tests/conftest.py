"""Shared test set-up.

Eight host CPU devices so mesh tests can run; this must happen before JAX is imported anywhere.
Checkpoint fixtures are written once per session and shared: every jit compile costs ~1 s here.
"""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Command-line tools run in-process enable JAX's persistent compilation cache: keep it out of $HOME.
os.environ.setdefault("KIMI_JAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="kimi_jax_xla_"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
    """Factory: fixture_dir(name, cfg) writes (once) a random checkpoint in the official layout."""
    from kimi_jax.fixtures import make_fixture_checkpoint

    made = {}

    def make(name, cfg, **kw):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            make_fixture_checkpoint(path, cfg, **kw)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    """A K2-layout tokenizer over the 256 single bytes: every special token, one id per byte."""
    from kimi_jax.chat import Tokenizer, byte_level_ranks, write_tokenizer_files

    path = tmp_path_factory.mktemp("byte_tokenizer")
    write_tokenizer_files(path, byte_level_ranks())
    return Tokenizer.from_dir(path)


@pytest.fixture(scope="session")
def nano_tokenizer():
    """The bundled nano model's tokenizer."""
    from kimi_jax.chat import Tokenizer

    return Tokenizer.from_dir(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "kimi-k2-nano")


@pytest.fixture(params=["nano", "bytes"])
def tokenizer(request, nano_tokenizer, byte_tokenizer):
    """Each test twice: on the nano model's tokenizer and on the byte-level one."""
    return nano_tokenizer if request.param == "nano" else byte_tokenizer
