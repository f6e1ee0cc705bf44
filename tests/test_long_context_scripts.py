"""The long-context scripts run end to end at small sizes, so that the commands BENCHMARKS.md (bf16
drift) and docs/k2-format.md §4.3 (131K greedy comparison) give for their figures keep working."""

import json

import pytest
from scripts_loader import load_script

bench_bf16_drift = load_script("bench_bf16_drift")
long_context_greedy = load_script("long_context_greedy")

pytestmark = pytest.mark.slow


def test_bf16_drift_reports_a_row_per_prompt_length(tmp_path, capsys):
    out = tmp_path / "drift.json"
    assert bench_bf16_drift.main(["--lengths", "80", "--new", "4", "--chunk", "32", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["prompt_tokens"] == 80
    assert 0 < row["max_logit_diff"] < row["logit_scale"]  # bf16 differs, but is not garbage
    assert row["median_logit_diff"] <= row["p99_logit_diff"] <= row["max_logit_diff"]
    assert 0 <= row["greedy_leading_equal"] <= row["greedy_equal"] <= 4
    table = capsys.readouterr().out
    assert "| 80 |" in table and "`python scripts/bench_bf16_drift.py --lengths 80 --new 4" in table


def test_bf16_drift_refuses_lengths_past_the_context():
    assert bench_bf16_drift.main(["--lengths", "300000"]) == 2


def test_greedy_comparison_agrees_with_transformers_on_a_short_prompt():
    result = long_context_greedy.compare(96, 4, chunk=32)
    assert result["equal"] == 4 and result["first_difference"] is None
    assert result["kimi_jax"] == result["transformers"]
