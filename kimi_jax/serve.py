"""`python -m kimi_jax.serve`: an OpenAI-compatible HTTP server over the batching engine.

    python -m kimi_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                             [--max-batch N] [--max-len L] [--mesh data=1,expert=8,tensor=1]

It listens on loopback unless told otherwise; give --api-key (or KIMI_API_KEY) before exposing it.
The server returns tool calls and never runs them: the client does. docs/serving.md has the API.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time

from kimi_jax import compile_cache, distributed, speculation
from kimi_jax.errors import KimiError
from kimi_jax.runtime import DEFAULT_CHECKPOINT
from kimi_jax.scheduler import DEFAULT_CHUNK

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="HF-layout or converted checkpoint directory (default: the bundled "
                                        "nano model, checkpoints/kimi-k2-nano)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KIMI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $KIMI_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the checkpoint's folder name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None, help="tokens one request may use, prompt and completion "
                                                              "(default 4096, capped by the model)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the most completion tokens one request may ask for (default: --max-len)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="request body limit (default 8 MiB)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prefill chunk size in tokens")
    p.add_argument("--page-size", type=int, default=None,
                   help="cache tokens per page (default 64; 128 on TPU). Requests share whole pages of a common "
                        "prefix, so smaller pages share more of it")
    p.add_argument("--n-pages", type=int, default=None,
                   help="pages in the latent cache (default: --max-batch requests of --max-len tokens, and as "
                        "much again for cached prefixes; `python -m kimi_jax.plan` sizes the same pool)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--mesh", help="device mesh, e.g. data=1,expert=4,tensor=2 (default: all local devices)")
    p.add_argument("--no-strict-tools", action="store_true",
                   help="do not hold tool-call arguments to their schemas (tool_choice and response_format are "
                        "still enforced)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the engine before listening")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    speculation.add_arguments(p)
    distributed.add_arguments(p)
    compile_cache.add_arguments(p)
    return p


def _positive(value, flag: str):
    if value is not None and value < 1:
        raise KimiError(f"{flag} must be >= 1, got {value}")


def build_service(args, *, mirror: bool = False):
    """Load the checkpoint and start the engine: (Service, BatchEngine). The caller stops the engine.
    `mirror`: a multi-process run, where process 0 serves and the others follow its engine; only
    process 0 starts it."""
    from kimi_jax.runtime import Runtime
    from kimi_jax.sampling import checkpoint_defaults
    from kimi_jax.server.service import Service, Settings

    for flag in ("max_batch", "max_len", "max_tokens", "max_queue", "max_body_bytes", "chunk", "page_size", "n_pages"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if not os.path.isdir(checkpoint):
        hint = "" if args.checkpoint else " (the bundled default model is missing; pass --checkpoint DIR)"
        raise KimiError(f"checkpoint directory '{checkpoint}' not found{hint}")
    rt = Runtime.load(checkpoint, dtype=args.dtype, max_len=args.max_len, mesh=args.mesh, chunk=args.chunk,
                      max_batch=args.max_batch, max_queue=args.max_queue, page_size=args.page_size,
                      n_pages=args.n_pages, mirror=mirror, progress=False, compile_cache=compile_cache.from_args(args),
                      speculate=args.speculate, draft_tokens=args.draft_tokens)
    rt.require_chat()
    engine, max_len = rt.engine, rt.engine.max_len
    settings = Settings(model_name=args.served_model_name or os.path.basename(os.path.abspath(checkpoint)),
                        max_tokens=min(args.max_tokens or max_len, max_len), api_key=args.api_key or None,
                        max_body_bytes=args.max_body_bytes, defaults=checkpoint_defaults(checkpoint),
                        strict_tools=not args.no_strict_tools)
    service = Service(rt, engine, settings)
    if not args.no_warmup:  # every process: the programs run as collectives over the whole mesh
        engine.warm_up(masks=settings.strict_tools)  # strict tool calls run the masked programs
    if not distributed.is_main():
        return service, engine
    engine.start()
    return service, engine


class BackgroundServer:
    """The app served by uvicorn on a thread (tests, benchmarks). Port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kimi_jax.serve")
    try:
        import uvicorn

        from kimi_jax.server.app import create_app
    except ImportError as e:
        print(f"error: the server needs the 'serve' extra (from the repository: pip install -e '.[serve]'): {e}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    try:
        t0 = time.perf_counter()
        mirror = distributed.initialize_from(args)
        service, engine = build_service(args, mirror=mirror)
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_main():
        import jax

        log.info("process %d follows process 0's engine", jax.process_index())
        engine.follow()
        return 0
    log.info("serving %s as '%s' (max_len %d, max_batch %d) after %.1fs on http://%s:%d/v1",
             service.runtime.checkpoint, service.settings.model_name, service.max_len, args.max_batch,
             time.perf_counter() - t0, args.host, args.port)
    with contextlib.ExitStack() as stack:
        stack.callback(engine.stop)
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
