"""The hardware table of README.md, the quickstart notebook and docs/troubleshooting.md: K2 Thinking
planned on the machines people ask about, by the planner itself (`python -m kimi_jax.plan --table`).

`--table --write` plans every row, stores each plan in docs/hardware-table.json and puts the same
rendered table between the markers below in each file that shows it. tests/test_hardware_table.py
checks that every copy matches the stored plans and that the planner, re-run with the stored
compiled temporaries (the only slow part), still gives every number in them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "docs" / "hardware-table.json"
FILES = ("README.md", "notebooks/quickstart.ipynb", "docs/troubleshooting.md")
BEGIN = "<!-- hardware table: python -m kimi_jax.plan --table --write -->"
END = "<!-- /hardware table -->"
CONFIG = "k2-thinking"
BATCHES = (1, 8, 32)  # the columns; a plan has them all
SERVING_FRACTION = 0.95  # the GPU share the docs' commands give XLA (XLA_PYTHON_CLIENT_MEM_FRACTION)


@dataclasses.dataclass(frozen=True)
class Row:
    target: str
    gpu_fraction: float | None = None  # GPU rows: XLA_PYTHON_CLIENT_MEM_FRACTION


ROWS = (
    Row("h100", SERVING_FRACTION),
    Row("h200", SERVING_FRACTION),
    Row("h200", 0.75),  # JAX's default, what a GPU run gets unless the variable is set
    Row("b200", SERVING_FRACTION),
    Row("v5p:2x2x2"),
    Row("tpu7x:2x2x1"),
    Row("v6e:2x4"),
)


def _short_mesh(mesh: str) -> str:
    axes = [part for part in mesh.split(",") if not part.endswith("=1")]
    return ",".join(axes) or "one device"


def _gb(x, digits: int = 1) -> str:
    return f"{x / 1e9:.{digits}f} GB"


def _cell(tokens: int, limit: int) -> str:
    if tokens == 0:
        return "no"
    return f"**{limit:,}** (room for {tokens:,})" if tokens > limit else f"{tokens:,}"


def _memory(record: dict) -> str:
    p, fraction = record["plan"], record["gpu_fraction"]
    if fraction is None:
        return f"{_gb(p['memory_bytes'])} ({p['memory_bytes'] / 2**30:g} GiB)"
    return f"{_gb(p['memory_bytes'])} ({fraction:g} × {_gb(p['memory_bytes'] / fraction)})"


def render(records: list[dict]) -> str:
    """The markdown table (between its markers) of stored plans."""
    sources = {}
    lines = [BEGIN, "",
             "| `--target` | devices | memory per device for XLA | best mesh | weights per device | temporaries, "
             "prefill / decode | " + " | ".join(f"longest context, batch {b}" for b in BATCHES) + " |",
             "|---" * (6 + len(BATCHES)) + "|"]
    for r in records:
        p, best = r["plan"], r["plan"]["best"]
        fits_at_all = best["fits"][str(BATCHES[0])] > 0
        if best["prefill_temp_bytes"] is None:
            temps = "–"
        else:
            mark = sources.setdefault(best["temporaries_from"], "*" * (len(sources) + 1))
            temps = f"{_gb(best['prefill_temp_bytes'], 2)} / {_gb(best['decode_temp_bytes'], 2)}{mark}"
        cells = [_cell(best["fits"][str(b)], p["max_positions"]) for b in BATCHES]
        lines.append(f"| `{p['target']}` | {p['hardware'].replace(' x ', ' × ')} | {_memory(r)} | "
                     f"{'`' + _short_mesh(best['mesh']) + '`' if fits_at_all else 'none fits'} | "
                     f"{_gb(best['weight_bytes'])} | {temps} | " + " | ".join(cells) + " |")
    lines.append("")
    for how, mark in sources.items():
        lines.append(f"{mark} Temporaries: {how}.  ")
    lines += [f"GPU memory: XLA_PYTHON_CLIENT_MEM_FRACTION × what the GPU reports; {SERVING_FRACTION:g} is what "
              "the GPU commands here set, 0.75 JAX's default. Context: the longest `--max-len` per sequence "
              "whose page pool (twice that, for cached prefixes) fits; bold where the model's "
              f"{records[0]['plan']['max_positions']:,} positions are the limit, not memory.", "", END]
    return "\n".join(lines)


def records_json(records) -> str:
    return json.dumps(records, indent=1, sort_keys=True) + "\n"


def _block(text: str) -> re.Pattern:
    return re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)


def blocks_in(path: pathlib.Path) -> list[str]:
    """The hardware tables a file shows (a notebook's markdown cells, or the file itself)."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        texts = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    else:
        texts = [path.read_text()]
    return [m.group(0) for t in texts for m in _block(t).finditer(t)]


def write_into(path: pathlib.Path, table: str) -> None:
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        for c in nb["cells"]:
            text = "".join(c["source"])
            if c["cell_type"] == "markdown" and BEGIN in text:
                c["source"] = _block(text).sub(lambda m: table, text).splitlines(keepends=True)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    else:
        text = path.read_text()
        path.write_text(_block(text).sub(lambda m: table, text))


def main(args, plan_for, to_json, *, write: bool) -> int:
    """--table: plan each row (K2 Thinking; the CLI's other settings), print the table (--json: the
    plans), and with `write` store them where the docs show them."""
    from kimi_jax.errors import KimiError

    records = []
    for row in ROWS:
        args.target, args.config, args.mesh, args.devices, args.hbm_gb = row.target, CONFIG, None, None, None
        p = plan_for(args, row.target, gpu_fraction=row.gpu_fraction)
        records.append({"target": row.target, "gpu_fraction": row.gpu_fraction, "plan": to_json(p)})
    records = json.loads(records_json(records))  # the stored form: string keys, as the test reads them back
    table = render(records)
    print(records_json(records) if args.json else table)
    if write:
        missing = [f for f in FILES if not blocks_in(ROOT / f)]
        if missing:
            raise KimiError(f"no hardware table markers ({BEGIN}) in {', '.join(missing)}")
        DATA.write_text(records_json(records))
        for f in FILES:
            write_into(ROOT / f, table)
        print(f"wrote {DATA.relative_to(ROOT)} and the table in {', '.join(FILES)}", file=sys.stderr)
    return 0
