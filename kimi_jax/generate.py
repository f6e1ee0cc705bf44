"""`python -m kimi_jax.generate`: run a K2-architecture checkpoint from the command line.

Modes:
  chat (default)  the prompt goes through the checkpoint's chat template; thinking, tool calls and
                  the answer are shown apart; with --tools builtin the model's tool calls run.
                  Without --prompt on a terminal it is an interactive chat.
  --raw           the prompt text is tokenized as is and the continuation printed.
  --prompt-ids    token ids in, token ids out (no tokenizer needed).

User errors print one `error: ...` line and exit 2; Ctrl-C stops generation and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from kimi_jax import compile_cache, distributed, speculation
from kimi_jax.errors import KimiError
from kimi_jax.runtime import DEFAULT_CHECKPOINT
from kimi_jax.scheduler import DEFAULT_CHUNK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="HF-layout or converted checkpoint directory (default: the bundled "
                                        "nano model, checkpoints/kimi-k2-nano)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (chat message, or raw text with --raw)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as is")
    p.add_argument("--system", help="system prompt (chat mode)")
    from kimi_jax.tools import builtin_tools  # the list in the help is the registry's own

    p.add_argument("--tools", choices=("none", "builtin"), default="none",
                   help="'builtin': let the model call safe demo tools (no shell, network or files): "
                        + ", ".join(builtin_tools().names()))
    p.add_argument("--max-steps", type=int, default=300, help="tool-call rounds per answer (default 300)")
    p.add_argument("--no-strict-tools", action="store_true",
                   help="let the model write tool calls freely (by default every call names a declared tool and "
                        "its arguments fit the tool's schema)")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the model's reasoning")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per model turn (default: generation "
                                                                     "config or 512)")
    p.add_argument("--max-len", type=int, default=None, help="cache capacity in tokens (default 4096, capped by "
                                                              "the model's max_position_embeddings)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--mesh", help="device mesh, e.g. data=1,expert=4,tensor=2 (default: all local devices)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prefill chunk size in tokens")
    speculation.add_arguments(p)
    distributed.add_arguments(p)
    compile_cache.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KimiError(f"--prompt-ids must be comma-separated integers, got '{text}'") from None
    if not ids:
        raise KimiError("--prompt-ids is empty")
    return ids


def run(args) -> int:
    if distributed.initialize_from(args):
        # Native collective libraries write to file descriptor 1; keep stdout for our own output.
        sys.stdout.flush()
        ours = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(ours, "w")
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # one answer per run: only process 0 prints
            args.json = True  # and no progress bars from the others
    from kimi_jax.runtime import Runtime
    from kimi_jax.sampling import SamplingParams, checkpoint_defaults

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if not os.path.isdir(checkpoint):
        hint = "" if args.checkpoint else " (the bundled default model is missing; pass --checkpoint DIR)"
        raise KimiError(f"checkpoint directory '{checkpoint}' not found{hint}")
    if args.prompt is not None and not args.prompt.strip() and not args.raw:
        raise KimiError("empty prompt")
    if args.prompt_ids is None and args.prompt is None and (args.raw or not sys.stdin.isatty()):
        raise KimiError("give --prompt TEXT or --prompt-ids IDS (interactive chat needs a terminal)")
    defaults = checkpoint_defaults(checkpoint)
    pick = lambda flag, key, fallback: flag if flag is not None else defaults.get(key, fallback)  # noqa: E731
    sampling = SamplingParams(
        temperature=float(pick(args.temperature, "temperature", 0.0)),
        top_p=float(pick(args.top_p, "top_p", 1.0)),
        top_k=int(pick(args.top_k, "top_k", 0)),
        seed=args.seed,
        max_new_tokens=int(pick(args.max_new_tokens, "max_new_tokens", 512)),
    )
    log = sys.stderr
    t0 = time.perf_counter()
    rt = Runtime.load(checkpoint, dtype=args.dtype, max_len=args.max_len, mesh=args.mesh, chunk=args.chunk,
                      progress=not args.json, compile_cache=compile_cache.from_args(args),
                      speculate=args.speculate, draft_tokens=args.draft_tokens)
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f}s", file=log)

    if args.prompt_ids is not None or args.raw:
        return _run_raw(rt, args, sampling)
    from kimi_jax.chat_cli import run_chat

    return run_chat(rt, args, sampling)


def _run_raw(rt, args, sampling) -> int:
    if args.prompt_ids is not None:
        ids = _parse_ids(args.prompt_ids)  # the engine checks them against the model's vocabulary
    else:
        if not args.prompt:
            raise KimiError("empty prompt")
        if rt.tokenizer is None:
            raise KimiError(f"{rt.checkpoint}: tiktoken.model not found; --raw --prompt needs the tokenizer "
                            "(use --prompt-ids for a bare checkpoint)")
        ids = rt.tokenizer.encode(args.prompt)
    # Ids in, ids out: --prompt-ids never needs the tokenizer, which may cover fewer ids than the
    # model's vocabulary (a bare or test checkpoint); text comes along only where it can be decoded.
    streams_text = args.prompt_ids is None and not args.json
    decoder = rt.tokenizer.stream_decoder() if streams_text else None

    def show(request, new_tokens, finished):
        if decoder is not None:
            sys.stdout.write("".join(decoder.add(t) for t in new_tokens))
            sys.stdout.flush()

    request = rt.engine.submit(ids, dataclasses.replace(sampling, stop_ids=rt.stop_ids()), show)
    interrupted = False
    try:
        rt.engine.wait([request])
    except KeyboardInterrupt:
        request.cancel()
        rt.engine.wait([request])
        interrupted = True
    out = request.tokens
    text = _decode_or_none(rt.tokenizer, out)
    if args.json:
        print(json.dumps({"token_ids": out, "text": text, "finish_reason": request.finish_reason,
                          "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out)}}, ensure_ascii=False))
    else:
        if decoder is not None:
            sys.stdout.write(decoder.flush() + "\n")
        else:
            print(",".join(map(str, out)))
        _print_speed(request)
    return 130 if interrupted else 0


def _decode_or_none(tokenizer, ids: list[int]) -> str | None:
    """The text of `ids`, or None without a tokenizer or when it lacks one of them."""
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode(ids)
    except KimiError:
        return None


def _print_speed(request) -> None:
    n = len(request.tokens)
    first = (request.first_token_at or request.finished_at) - request.submitted_at
    rest = request.finished_at - (request.first_token_at or request.finished_at)
    rate = (n - 1) / rest if n > 1 and rest > 0 else float("nan")
    print(f"[{request.prompt_tokens} prompt tokens, first token after {first:.2f}s, {n} new tokens at "
          f"{rate:.1f} tok/s]", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
