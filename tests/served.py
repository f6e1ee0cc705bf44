"""The bundled nano model behind the OpenAI-compatible server, for the tests that drive it over
HTTP with the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import urllib.request

import openai

from kimi_jax import serve
from kimi_jax.server.app import create_app

MODEL = "kimi-k2-nano"


@contextlib.contextmanager
def nano_server(*extra_args: str):
    """A started server with 8 slots of 1024 tokens on one device (`srv.url`, `srv.service`,
    `srv.engine`), without speculation unless `extra_args` turn it on (its verify programs cost
    compile time in every test); the engine stops on exit."""
    args = serve.build_parser().parse_args(["--mesh", "data=1", "--max-len", "1024", "--max-batch", "8",
                                            "--speculate", "off", *extra_args])
    service, engine = serve.build_service(args)
    try:
        with serve.BackgroundServer(create_app(service)) as srv:
            srv.service, srv.engine = service, engine
            yield srv
    finally:
        engine.stop()


def client_for(server, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def metrics(server) -> dict:
    with urllib.request.urlopen(server.url + "/metrics?format=json", timeout=10) as r:
        return json.loads(r.read())
