"""The generate CLI: JSON output, and bad input as one readable line with a non-zero exit."""

import io
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
    (["--prompt", "hi", "--max-len", "16"], "does not fit the context of 16 tokens"),
    (["--prompt", "hi", "--max-len", "16", "--json", "--tools", "builtin"], "does not fit the context of 16 tokens"),
    (["--raw", "--prompt", ""], "empty prompt"),
])
def test_bad_input_gives_one_error_line_and_exit_2(ckpt, capsys, argv, message):
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", ckpt, *argv]
    assert generate.main(argv) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert out == ""  # no answer, not even an empty one


def test_interactive_chat_reports_a_message_too_long_and_goes_on(ckpt, capsys, monkeypatch):
    lines = iter(["a message far longer than sixteen tokens of context", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    assert generate.main(["--checkpoint", ckpt, "--max-len", "16"]) == 0  # the empty line quits
    err = capsys.readouterr().err
    assert "error: prompt of" in err and "does not fit the context of 16 tokens" in err
    assert next(lines, "used up") == "used up"  # the second line was read: the chat went on


def test_help_lists_every_builtin_tool(capsys):
    from kimi_jax.tools import builtin_tools

    with pytest.raises(SystemExit):
        generate.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in builtin_tools().names())
    assert "current_time" in help_text


def test_a_parse_warning_gets_its_own_line_after_streamed_text():
    from kimi_jax.chat import ParseWarning, ReasoningDelta
    from kimi_jax.chat_cli import EventPrinter

    terminal = io.StringIO()  # stdout and stderr of one terminal
    printer = EventPrinter(terminal, err=terminal, color=False)
    printer(ReasoningDelta("still thinking"))
    printer(ParseWarning("output ended inside <think>"))
    assert terminal.getvalue().splitlines() == ["thinking: still thinking",
                                                "[parse warning: output ended inside <think>]"]


def test_prompt_ids_in_give_ids_out_when_the_tokenizer_covers_fewer_ids_than_the_model(fixture_dir, capsys):
    # A K2-shaped model (163,840 ids) with a small test tokenizer: the model may generate ids the
    # tokenizer cannot name. Here 1,024 ids against the fixture tokenizer's 512.
    wide = str(fixture_dir("cli_wide_vocab", with_fixture_token_ids(TINY.replace(vocab_size=1024))))
    args = ["--checkpoint", wide, "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "6", "--dtype", "float32"]
    assert generate.main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) == 6 and max(result["token_ids"]) >= 512  # beyond the tokenizer
    assert result["text"] is None
    assert generate.main(args) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, result["token_ids"]))


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
