"""From nothing to a trained kimi-k2-nano in one command: data, tokenizer, training with INT4 QAT,
export — sized to finish inside one 10-minute call on a lent GPU, and packed to come back from it.

On the lent GPU machine (an NVIDIA H200 image with jax[cuda], flax, optax, tokenizers, tiktoken,
jinja2 and safetensors), from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/nano_pipeline.py --work /tmp/nano --pack $OUT

(device `run` with timeout_s=600). It stops training in time to export and pack by
--budget-seconds (default 540), shrinking both phases alike if the GPU is slower than planned
(train_nano.py --max-train-seconds), and writes $OUT/nano.tar.partNN files of at most 15 MiB plus
$OUT/pipeline.log. Back on the workstation:

    cat FILES_AT/nano.tar.part* | tar -x -C out/      # out/nano/{kimi-k2-nano,nano_float,pipeline.log}
    PYTHONPATH=. python scripts/make_agent_data.py --out out/agent_data     # the same eval sets (seeded)
    PYTHONPATH=. python scripts/eval_nano.py --qat out/nano/kimi-k2-nano --float out/nano/nano_float

On a CPU, run the three scripts one by one instead (see scripts/train_nano.py and the model card's
recipe); the pipeline works there too, only slowly. It trains the GPU recipe (GPU_RECIPE: the
"large" model, 64 rows a step); arguments after `--` go to train_nano.py and override it (e.g.
`-- --steps 8000`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tarfile
import time

NEEDS = {"jax": "0.7", "flax": "0.12", "optax": "0.2", "tokenizers": "0.15", "tiktoken": "0.7", "jinja2": "3.1",
         "safetensors": "0.4", "numpy": "1.26"}
PART_BYTES = 15 << 20  # a lent machine returns files of at most 16 MiB
GPU_RECIPE = ["--size", "large", "--batch", "64", "--steps", "7000", "--qat-steps", "1000", "--lr", "2e-3"]


class _Tee:
    """stderr to the terminal and to the log that travels back with the checkpoints."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, "a", encoding="utf-8")

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stream.flush()

    def close(self):  # logging handlers created while this was sys.stderr close it at exit
        self.file.close()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the terminal's
        return getattr(self.stream, name)


def check_packages() -> str:
    """One line of versions, or SystemExit naming every missing or too-old package."""
    found, problems = [], []
    for name, least in NEEDS.items():
        try:
            version = importlib.import_module(name).__version__
        except ImportError:
            problems.append(f"{name} is missing")
            continue
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < tuple(int(x) for x in least.split(".")):
            problems.append(f"{name} {version} is older than {least}")
        found.append(f"{name} {version}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + " (carry wheels: see the device notes on pip download)")
    return ", ".join(found)


def pack(directory: str, names: list[str], dest: str) -> list[str]:
    """tar `names` under `directory` into dest/nano.tar.partNN pieces of at most PART_BYTES."""
    os.makedirs(dest, exist_ok=True)
    tar_path = os.path.join(directory, "nano.tar")
    with tarfile.open(tar_path, "w") as tar:
        for name in names:
            tar.add(os.path.join(directory, name), arcname=os.path.join("nano", name))
    parts = []
    with open(tar_path, "rb") as f:
        while chunk := f.read(PART_BYTES):
            parts.append(os.path.join(dest, f"nano.tar.part{len(parts):02d}"))
            with open(parts[-1], "wb") as out:
                out.write(chunk)
    return parts


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="out/nano", help="where data, tokenizer and checkpoints go")
    ap.add_argument("--pack", help="also write the results as nano.tar.partNN files here (e.g. $OUT)")
    ap.add_argument("--budget-seconds", type=float, default=540, help="the whole pipeline's wall-clock budget")
    ap.add_argument("--export-reserve", type=float, default=60, help="seconds kept for export and packing")
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--ranks", type=int, default=3840)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    log_path = os.path.join(args.work, "pipeline.log")
    sys.stderr = _Tee(sys.__stderr__, log_path)
    try:
        import jax

        print(f"packages: {check_packages()}; devices: {jax.devices()}", file=sys.stderr)
        data, tok = os.path.join(args.work, "agent_data"), os.path.join(args.work, "tokenizer")
        import build_tokenizer
        import make_agent_data
        import train_nano

        make_agent_data.main(["--out", data, "--seed", str(args.seed), "--n-train", str(args.n_train)])
        build_tokenizer.main(["--data", data, "--out", tok, "--ranks", str(args.ranks)])
        budget = args.budget_seconds - (time.perf_counter() - t0) - args.export_reserve
        print(f"data and tokenizer ready at {time.perf_counter() - t0:.0f}s; training gets {budget:.0f}s",
              file=sys.stderr)
        rc = train_nano.main(["--data", data, "--tokenizer", tok, "--out", os.path.join(args.work, "kimi-k2-nano"),
                              "--float-out", os.path.join(args.work, "nano_float"),
                              "--cache", os.path.join(args.work, "cache"),
                              "--train-state", os.path.join(args.work, "train_state"),
                              "--workers", str(os.cpu_count() or 1), "--max-train-seconds", f"{max(budget, 1):.0f}",
                              "--seed", str(args.seed), *GPU_RECIPE, *train_args])
        print(f"pipeline finished in {time.perf_counter() - t0:.0f}s (rc {rc})", file=sys.stderr)
    finally:
        sys.stderr.close()
        sys.stderr = sys.__stderr__
    if args.pack:
        names = [n for n in ("kimi-k2-nano", "nano_float", "pipeline.log") if os.path.exists(os.path.join(args.work, n))]
        parts = pack(args.work, names, args.pack)
        shutil.copy2(log_path, os.path.join(args.pack, "pipeline.log"))
        print(f"packed {', '.join(names)} into {len(parts)} parts in {args.pack}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
