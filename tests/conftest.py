"""Shared test set-up.

Eight host CPU devices so mesh tests can run; this must happen before JAX is imported anywhere.
Checkpoint fixtures are written once per session and shared: every jit compile costs ~1 s here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
