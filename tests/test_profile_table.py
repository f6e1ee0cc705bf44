"""scripts/profile_table.py: the per-kernel table from a real CPU trace and from a GPU-shaped one."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest
from scripts_loader import load_script

pt = load_script("profile_table")


def test_table_of_a_real_cpu_trace_counts_each_kernel_once_per_step(tmp_path):
    step = jax.jit(lambda x: jnp.sin(x @ x).sum())
    table = pt.profile(step, (jnp.ones((128, 128)),), steps=4, trace_dir=tmp_path)
    assert table.source == "CPU thunks" and table.steps == 4
    assert pt.find_trace(tmp_path).name == "perfetto_trace.json.gz"
    per_step = {name: calls / table.steps for name, (calls, _) in table.kernels.items()}
    assert per_step and all(n == 1 for n in per_step.values()), per_step  # each fusion once a step
    assert any("sin" in name for name in per_step)
    assert 0 < table.busy_us <= sum(us for _, us in table.kernels.values()) + 1e-6
    assert 0.0 <= table.idle_share < 1.0 and table.d2h_per_step == 0
    text = pt.format_table(table)
    assert text.startswith("| kernel (CPU thunks) | us/step | calls/step | % of step |")
    assert "device idle" in text
    # Reading the same trace back without the measured wall time uses the span of the events.
    again = pt.parse_trace(tmp_path, steps=4)
    assert again.kernels == table.kernels and again.wall_us >= again.busy_us


def _write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


def test_gpu_trace_reads_stream_lines_and_counts_overlap_and_host_copies_once(tmp_path):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 10, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 11, "name": "thread_name", "args": {"name": "Stream #14(MemcpyD2H)"}},
        {"ph": "M", "pid": 2, "tid": 12, "name": "thread_name", "args": {"name": "XLA Modules"}},
    ]
    spans = []
    for step in range(2):  # two steps of 100 us wall each
        t = 100.0 * step
        spans += [
            {"ph": "X", "pid": 2, "tid": 12, "ts": t, "dur": 90.0, "name": "jit_step"},  # aggregate: ignored
            {"ph": "X", "pid": 2, "tid": 10, "ts": t + 0, "dur": 40.0, "name": "int4_swiglu_gemv"},
            {"ph": "X", "pid": 2, "tid": 10, "ts": t + 50, "dur": 20.0, "name": "loop_fusion"},
            {"ph": "X", "pid": 2, "tid": 11, "ts": t + 60, "dur": 20.0, "name": "MemcpyD2H"},  # overlaps 10 us
            {"ph": "X", "pid": 1, "tid": 1, "ts": t, "dur": 100.0, "name": "PjitFunction(step)"},  # host: ignored
        ]
    table = pt.parse_trace(_write_trace(tmp_path / "perfetto_trace.json.gz", meta + spans), steps=2, wall_us=200.0)
    assert table.source == "GPU streams"
    assert table.kernels == {"int4_swiglu_gemv": (2, 80.0), "loop_fusion": (2, 40.0), "MemcpyD2H": (2, 40.0)}
    assert table.busy_us == pytest.approx(2 * 70.0)  # 40 + (50..80), the copy's overlap counted once
    assert table.idle_share == pytest.approx(0.3) and table.d2h_per_step == 1
    lines = pt.format_table(table, top=2).splitlines()
    assert lines[2] == "| int4_swiglu_gemv | 40.0 | 1.00 | 40.0 |"
    assert lines[4].startswith("| (1 more) | 20.0 |")


def test_a_trace_without_device_work_is_an_error_naming_the_file(tmp_path):
    path = _write_trace(tmp_path / "perfetto_trace.json.gz", [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5,
                                                              "name": "python"}])
    with pytest.raises(ValueError, match="no device or XLA events"):
        pt.parse_trace(path, steps=1)
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        pt.find_trace(tmp_path / "missing_dir")
