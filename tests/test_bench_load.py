"""scripts/bench_load.py: the quick run measures cat, a fresh-memory write and a load in fresh processes."""

import json

from scripts_loader import load_script


def test_quick_run_reports_times_and_memory_of_a_real_load(capsys):
    assert load_script("bench_load").main(["--quick", "--json", "--repeat", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    (hf,) = out["results"]
    assert hf["kind"] == "hf" and hf["files"] == 4  # config.json, generation_config.json, index, one shard
    assert all(hf[k] > 0 for k in ("cat_s", "fresh_s", "load_s"))
    assert [len(v) for v in hf["runs"].values()] == [1, 1, 1, 1]  # cat, fresh on each page size, load
    assert hf["fresh_s"] == min(hf["runs"]["fresh_huge_s"] + hf["runs"]["fresh_small_s"])
    # the weights are the shards' tensors less the small weight_shape records; the files add
    # headers and JSON
    assert 0.5 * hf["bytes"] < hf["weights"] < hf["bytes"]
    assert out["largest_tensor"] > 0 and hf["beyond"] < 200e6


def test_markdown_row_names_machine_command_and_whether_targets_are_met(monkeypatch):
    bench = load_script("bench_load")
    monkeypatch.setattr(bench, "machine", lambda: "test box")
    r = {"kind": "hf", "files": 123, "bytes": 6.0e9, "cat_s": 0.8, "fresh_s": 1.0, "fresh_pages": "huge",
         "load_s": 1.4, "weights": 5.9e9, "beyond": 5e9}
    line = bench.row(r, largest=2.35e9, command="python scripts/bench_load.py")
    assert line.startswith("| ") and "| test box | `python scripts/bench_load.py` | load_model (bf16) |" in line
    assert "6 GB in 123 files, largest tensor 2.35 GB" in line
    # The floor is the slower of reading (cat) and writing fresh memory: 1.4 s / 1.0 s.
    assert "| 0.80 s | 1.00 s (huge pages) | 1.40 s" in line and "1.40× (met)" in line and "2.13× largest (not met)" in line
