"""The generate CLI: JSON output, and bad input as one readable line with a non-zero exit."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from kimi_jax import generate
from kimi_jax.checkpoint import load_model
from kimi_jax.config import TINY
from kimi_jax.engine import BatchEngine
from kimi_jax.fixtures import with_fixture_token_ids
from kimi_jax.sampling import SamplingParams

CFG = with_fixture_token_ids(TINY)


@pytest.fixture(scope="module")
def ckpt(fixture_dir):
    return str(fixture_dir("cli", CFG))


def test_prompt_ids_json_prints_one_object_with_the_greedy_tokens(ckpt, capsys):
    rc = generate.main(["--checkpoint", ckpt, "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                        "--dtype", "float32", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)  # the whole of stdout is one JSON object
    model, _ = load_model(ckpt, dtype=jnp.float32, progress=False)
    (want,) = BatchEngine(model, max_len=64, chunk=8).generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=6))
    assert result["token_ids"] == want.tokens
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 6}


def test_raw_text_prompt_streams_text(ckpt, capsys):
    rc = generate.main(["--checkpoint", ckpt, "--raw", "--prompt", "abc", "--max-new-tokens", "4", "--json",
                        "--temperature", "0.9", "--top-k", "20", "--seed", "3"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(result["token_ids"]) == 4 and isinstance(result["text"], str)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent", "--prompt-ids", "1"], "checkpoint directory '/nonexistent' not found"),
    (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", "1,99999"], "id 99999 is outside the vocabulary"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt-ids", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt-ids", "1", "--top-k", "-2"], "top_k must be an integer >= 0"),
    (["--prompt-ids", ",".join(["3"] * 40), "--max-len", "16"], "prompt of 40 tokens does not fit the context of 16 tokens"),
    (["--raw", "--prompt", ""], "empty prompt"),
])
def test_bad_input_gives_one_error_line_and_exit_2(ckpt, capsys, argv, message):
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", ckpt, *argv]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_module_entry_point_reports_bad_config_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CFG.to_hf(), "n_group": 3}))
    proc = subprocess.run([sys.executable, "-m", "kimi_jax.generate", "--checkpoint", str(tmp_path),
                           "--prompt-ids", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "field 'n_group'" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_compiled_programs_are_kept_for_the_next_run_unless_turned_off(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KIMI_JAX_COMPILE_CACHE", str(tmp_path / "unused"))
    args = ["--checkpoint", ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--json"]
    assert generate.main(args + ["--no-compile-cache"]) == 0 and not (tmp_path / "unused").exists()
    env = dict(os.environ)
    base = [sys.executable, "-m", "kimi_jax.generate", *args]
    on = subprocess.run(base + ["--compile-cache", str(tmp_path / "xla")], env=env, capture_output=True, text=True,
                        timeout=300)
    assert on.returncode == 0 and len(os.listdir(tmp_path / "xla")) >= 2  # prefill and decode at least
    again = subprocess.run(base + ["--compile-cache", str(tmp_path / "xla")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert json.loads(again.stdout)["token_ids"] == json.loads(on.stdout)["token_ids"]
