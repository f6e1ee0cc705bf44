"""The kernel benchmark scripts run end to end on CPU at tiny sizes: a GPU session is one shot, so a
typo in a late section must show up here, not after the first ten minutes of a lease."""

import json

import pytest
from scripts_loader import load_script

load_script("bench_common")  # the benchmarks import these siblings by name
load_script("profile_table")
bench_int4 = load_script("bench_int4")
bench_attention = load_script("bench_attention")
gpu_session = load_script("gpu_session")


@pytest.mark.slow
def test_gpu_session_runs_every_section_and_writes_its_tables(tmp_path):
    rc = gpu_session.main(["--tiny", "--impl", "xla", "--out", str(tmp_path), "--reps", "2",
                           "--hook", """-c "print('whole step hook ran')" """])
    assert rc == 0
    results = json.loads((tmp_path / "session.json").read_text())
    assert results["errors"] == [] and "skipped" not in results
    assert results["copy_gbps"] > 0
    assert [(r["op"], r["tokens_per_expert"]) for r in results["grouped"]] == \
        [("gate+up swiglu", 1), ("down", 1), ("gate+up swiglu", 4), ("down", 4)]
    assert all(r["us"] > 0 and r["bf16_us"] > 0 for r in results["grouped"])
    assert [(r["context"], r["batch"]) for r in results["attention"]] == [(64, 1), (64, 2)]
    assert [r["batch"] for r in results["layer"]] == [1, 8]
    assert results["decode_hook"]["returncode"] == 0
    assert "whole step hook ran" in (tmp_path / "decode.log").read_text()
    md = (tmp_path / "session.md").read_text()
    for title in ("INT4 grouped expert kernels", "paged MLA decode attention", "one K2 MoE layer", "profile"):
        assert f"## {title}" in md
    assert "device idle" in (tmp_path / "profile.md").read_text()


def test_bench_int4_runs_on_cpu(tmp_path):
    out = tmp_path / "int4.json"
    assert bench_int4.main(["--tiny", "--reps", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["impl"] == "xla" and len(results["grouped"]) == 4 and "dense" not in results
    # The MoE layer timed is the model's own, at every decode batch of the shapes.
    assert [r["batch"] for r in results["layer"]] == [1, 8] and all(r["us"] > 0 for r in results["layer"])


def test_bench_attention_runs_on_cpu(tmp_path):
    out = tmp_path / "attention.json"
    assert bench_attention.main(["--tiny", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["timings"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["ref_us"] > 0 for r in rows)
