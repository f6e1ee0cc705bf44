"""The server on two processes (gloo on CPU): process 0 serves HTTP, both step the same engine, and
the answers equal one process's."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from kimi_jax.runtime import Runtime
from kimi_jax.sampling import SamplingParams

pytestmark = pytest.mark.slow  # the whole module; `pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = os.path.join(ROOT, "checkpoints", "kimi-k2-nano")
MESH = "data=1,expert=4,tensor=2"  # 8 devices: 4 on each process
PROMPTS = ["What is 17 * 23?", "Convert 5 km to miles."]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url, procs, timeout=400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return json.loads(r.read()).get("status") == "ok"
        except OSError:
            time.sleep(1)
    return False


@pytest.fixture(scope="module")
def two_process_server(tmp_path_factory):
    coordinator, http = _free_port(), _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    logs = tmp_path_factory.mktemp("multihost")
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, "-m", "kimi_jax.serve", "--checkpoint", NANO, "--port", str(http), "--dtype", "float32",
               "--max-len", "512", "--max-batch", "2", "--mesh", MESH, "--coordinator", f"127.0.0.1:{coordinator}",
               "--num-processes", "2", "--process-id", str(pid), "--log-level", "warning"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(logs / f"process{pid}.log", "w"), cwd=ROOT))
    url = f"http://127.0.0.1:{http}"
    try:
        assert _wait_healthy(url, procs), (logs / "process0.log").read_text()[-3000:]
        yield url, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def test_two_processes_answer_like_one(two_process_server):
    url, procs = two_process_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    served = [client.completions.create(model="kimi-k2-nano", prompt=p, max_tokens=12, temperature=0).choices[0]
              for p in PROMPTS]
    rt = Runtime.load(NANO, dtype="float32", max_len=512, mesh=MESH, progress=False)
    alone = rt.engine.generate([rt.tokenizer.encode(p) for p in PROMPTS],
                               SamplingParams(max_new_tokens=12, stop_ids=rt.stop_ids()))
    stops = set(rt.stop_ids())  # a completion's text leaves out the token it stopped at
    assert [(c.text, c.finish_reason) for c in served] == \
        [(rt.tokenizer.decode([t for t in r.tokens if t not in stops]), r.finish_reason) for r in alone]
    # Process 0 shuts down on SIGINT and takes process 1 with it.
    procs[0].send_signal(signal.SIGINT)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
