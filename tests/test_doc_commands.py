"""Every shell command of README.md and docs/*.md (tests/doc_commands.py finds them) still works as
the page says, or is listed here with the reason a CPU test machine cannot run it.

Commands run as a reader runs them: from the repository root, with this environment's `python`
first on PATH (the "environment active" the docs assume), this checkout on the module path, and
one CPU device (no platform or device count from the test set-up). Where a page shows an
`error: ...` line, the command must exit 2 with exactly that line last on stderr; otherwise it
must exit 0. `pip install` commands are checked, not run, since they would change this
environment: each must install this checkout with extras that pyproject.toml defines (kimi-jax is
not on PyPI).
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest
from doc_commands import ROOT, doc_commands, output_block_after

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

QUICKSTART = ('python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m kimi_jax.generate '
              '--tools builtin --prompt "What is 17 * 23?"')

# Run exactly as written.
RUN = {
    'python -m kimi_jax.generate --max-len 64 --prompt "What is 17 * 23?" --tools builtin',
    'python -m kimi_jax.generate --raw --max-len 8 --prompt "hello there, how are you doing today?"',
    "python -m kimi_jax.generate --max-len 2000 --prompt hi",
    'python -m kimi_jax.generate --prompt "What is 17 * 23?" --tools builtin',
    "jupyter nbconvert --to notebook --execute notebooks/quickstart.ipynb --output-dir /tmp/kimi-notebook",
    # GPU hosts planned here from the activation model: seconds, no compile.
    "python -m kimi_jax.plan --config k2-thinking",
    "python -m kimi_jax.plan --config k2-thinking --target h100",
    "python -m kimi_jax.plan --config k2-thinking --target h200",
}

# Run in another form: the page's command -> what runs here.
RUN_AS = {
    # The virtual environment and the install are the environment this test runs in; the README
    # shows the output of the rest, which must match it.
    QUICKSTART: 'python -m kimi_jax.generate --tools builtin --prompt "What is 17 * 23?"',
}

# The server, started once for the client commands; on a free port instead of 8000 (a shared
# machine may have 8000 taken; the clients' URLs follow it), and with answers capped at 256 tokens
# so that no sampled answer can hold the test for minutes.
SERVER = "python -m kimi_jax.serve"
CLIENTS = {
    'curl -N http://127.0.0.1:8000/v1/chat/completions -d \'{"model": "kimi-k2-nano", "stream": true, '
    '"messages": [{"role": "user", "content": "Hi"}]}\'',
    'curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $KEY" -d \'{"model": '
    '"kimi-k2-nano", "messages": [{"role": "user", "content": "What is 17*23?"}]}\'',
    'curl -N http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $KEY" -d \'{"model": '
    '"kimi-k2-nano", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}\'',
    'curl http://127.0.0.1:8000/v1/completions -d \'{"prompt": "The capital of France is", "max_tokens": 8}\'',
    "curl http://127.0.0.1:8000/metrics",
}

_K2_PLAN = ("compiles K2 Thinking cut to 2 and 3 layers for a TPU v5p slice with libtpu: minutes on a 2-core CPU "
            "(BENCHMARKS.md); tests/test_hardware_table.py checks its figures in the docs")
CANNOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q":
        "is this test suite (about 16 minutes); .ci/run runs exactly this command",
    "python -m kimi_jax.plan --config k2-thinking --target v5p:2x2x2": _K2_PLAN,
    'python -m kimi_jax.serve --checkpoint /models/Kimi-K2-Thinking --mesh tensor=8 --max-batch 32 --max-len 65536 '
    '--api-key "$KEY"': "needs the 594 GB K2 Thinking checkpoint and 8 accelerators",
    "python scripts/bench_serve.py --quick":
        "a benchmark of a couple of minutes; tests/test_bench_serve.py runs its agent and its reference",
    "python scripts/bench_serve.py --checkpoint DIR --mesh data=1,expert=8,tensor=1 --json out.json":
        "DIR stands for a real checkpoint, served on 8 devices",
    'JAX_PLATFORMS=cuda python -m kimi_jax.generate --prompt "What is 17 * 23?" --tools builtin': "needs a GPU",
}


def _is_install(text: str) -> bool:
    return bool(re.fullmatch(r"pip install .*", text))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env  # KIMI_JAX_COMPILE_CACHE stays: conftest keeps compiled programs out of $HOME


def _bash(command: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env={**_env(), **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_every_command_is_run_or_has_a_reason():
    placed = RUN | set(RUN_AS) | {SERVER} | CLIENTS | set(CANNOT_RUN)
    found = doc_commands()
    unplaced = [str(c) for c in found if c.text not in placed and not _is_install(c.text)]
    assert not unplaced, "run these in this test, or add them to CANNOT_RUN with the reason:\n" + "\n".join(unplaced)
    stale = placed - {c.text for c in found}
    assert not stale, f"no page shows these any more: {sorted(stale)}"


def test_install_commands_install_this_checkout_with_extras_it_defines():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = [(c, part.strip()) for c in doc_commands() for part in c.text.split("&&") if "pip install" in part]
    assert len(installs) >= 4
    for command, part in installs:
        words = shlex.split(part)
        targets = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
        for target in targets:
            name, _, rest = target.partition("[")
            assert name.replace("_", "-") != "kimi-jax", f"{command}: kimi-jax is not on PyPI; install the checkout"
            if name == ".":
                assert "-e" in words, f"{command}: install the checkout editable, as the docs say everywhere"
                assert set(filter(None, rest.rstrip("]").split(","))) <= extras, f"{command}: unknown extra"


def _last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in doc_commands() if c.text in RUN], ids=str)
def test_command_runs_as_the_page_says(command):
    errors = [line for line in command.shown if line.startswith("error: ")]
    proc = _bash(command.text)
    if errors:
        assert (proc.returncode, _last_line(proc.stderr)) == (2, errors[-1]), proc.stderr
        assert proc.stdout == ""
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_the_readme_quickstart_prints_the_output_it_shows():
    (command,) = [c for c in doc_commands() if c.text == QUICKSTART]
    proc = _bash(RUN_AS[QUICKSTART])
    assert proc.returncode == 0, proc.stderr[-3000:]
    *answer, summary = output_block_after(command.page, command.line)
    assert proc.stdout.splitlines() == answer
    # The summary line goes to stderr; its token counts are the same in every greedy run, its times not.
    numbers = re.compile(r"\d+(?:\.\d+)?s, \d+(?:\.\d+)? tok/s")
    assert numbers.sub("T", _last_line(proc.stderr)) == numbers.sub("T", summary)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {SERVER} --port {port} --max-tokens 256"], cwd=ROOT, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _check_answer(command: str, output: str) -> None:
    if command.endswith("/metrics"):
        assert "# TYPE kimi_jax_requests_finished counter" in output
    elif '"stream": true' in command:
        events = [line.removeprefix("data: ") for line in output.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1])
    else:
        assert json.loads(output)["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in doc_commands() if c.text in CLIENTS], ids=str)
def test_client_command_gets_an_answer_from_the_documented_server(server, command):
    proc = _bash(command.text.replace("127.0.0.1:8000", f"127.0.0.1:{server}"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_answer(command.text, proc.stdout)

