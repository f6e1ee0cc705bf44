"""The hardware table of README.md, the quickstart notebook and docs/troubleshooting.md is the
planner's output: every copy is the rendering of the plans stored in docs/hardware-table.json, and
the planner, run again, gives every stored figure. Compiled temporaries (libtpu's, minutes per TPU
row) are taken from the store; everything else is planned afresh: exact weight and cache bytes per
mesh, the GPU activation model, the memory of each target, the mesh chosen, the reasons the others
lose, the context at each batch size. A change to any of them fails here until
`python -m kimi_jax.plan --table --write` is run again."""

import json

import pytest

from kimi_jax import plan
from kimi_jax.config import get_preset
from kimi_jax.planner import table

RECORDS = json.loads(table.DATA.read_text())
TIMINGS = ("seconds", "compile_seconds")


def test_every_copy_of_the_table_is_the_rendering_of_the_stored_plans():
    want = table.render(RECORDS)
    for name in table.FILES:
        assert table.blocks_in(table.ROOT / name) == [want], f"{name}: run python -m kimi_jax.plan --table --write"


def test_the_store_has_a_plan_for_every_row_of_the_table():
    assert [(r["target"], r["gpu_fraction"]) for r in RECORDS] == [(row.target, row.gpu_fraction)
                                                                    for row in table.ROWS]
    assert {r["plan"]["config"] for r in RECORDS} == {table.CONFIG}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: f"{r['target']}-{r['gpu_fraction']}")
def test_the_planner_gives_every_stored_figure_again(record):
    stored = record["plan"]
    compiled = {m["mesh"]: {"prefill": m["prefill_temp_bytes"], "decode": m["decode_temp_bytes"],
                            "how": m["temporaries_from"], "refused": m["refused"] or {}, "seconds": 0}
                for m in stored["meshes"] if m["prefill_temp_bytes"] is not None}
    fresh = plan.plan(get_preset(table.CONFIG), record["target"], config_name=stored["config"],
                      max_len=stored["max_len"], batch=stored["batch"], chunk=stored["chunk"], dtype=stored["dtype"],
                      gpu_fraction=record["gpu_fraction"], recorded=compiled, progress=None)
    assert _without_timings(json.loads(json.dumps(plan.to_json(fresh)))) == _without_timings(stored)
