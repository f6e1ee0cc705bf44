"""The loader's read path: every device holds exactly its block of the stored tensors; safetensors
headers that do not fit their file are named; the per-parameter transform hook; memory bounds; the
fresh host memory a CPU load writes into (aligned, adopted by XLA without a copy, on huge pages)."""

import contextlib
import json
import os
import struct
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from kimi_jax import export, fixtures
from kimi_jax.checkpoint import load_model
from kimi_jax.checkpoint.host_memory import HUGE_PAGE, XLA_CPU_ALIGNMENT, PageSizeChooser, new_host_array
from kimi_jax.checkpoint.loader import _ByteBudget, convert_on_host
from kimi_jax.checkpoint.safetensors_file import SafetensorsFile
from kimi_jax.config import TINY, Int4Quant
from kimi_jax.errors import CheckpointError, KimiError
from kimi_jax.export import iter_hf_tensors
from kimi_jax.quant import Int4Weight
from kimi_jax.sharding import MeshSpec, make_mesh

CFG = fixtures.with_fixture_token_ids(TINY.replace(quantization=Int4Quant(group_size=16)))  # as test_int4_model


@pytest.fixture(scope="module")
def ckpt(fixture_dir):
    return fixture_dir("int4", CFG)


@pytest.fixture(scope="module")
def stored(ckpt):
    """Every tensor of the checkpoint, read by the safetensors library: an independent reader."""
    out = {}
    for file in sorted(os.listdir(ckpt)):
        if file.endswith(".safetensors"):
            out.update(load_file(os.path.join(ckpt, file)))
    return out


@pytest.fixture(scope="module")
def f32_model(ckpt):
    return load_model(ckpt, dtype=jnp.float32, progress=False)[0]


def _params(model):
    return dict(nnx.to_flat_state(nnx.state(model)))


def test_loaded_parameters_are_the_stored_tensors_bit_for_bit(ckpt, stored, f32_model):
    bf16, _ = load_model(ckpt, dtype=jnp.bfloat16, progress=False)  # the stored dtype: a plain copy
    for model, dtype in ((bf16, ml_dtypes.bfloat16), (f32_model, np.float32)):  # f32: converted in the copy
        names = set()
        for name, value in iter_hf_tensors(model):
            want = stored[name]
            if want.dtype == ml_dtypes.bfloat16 and not name.endswith("weight_scale"):  # scales stay bf16
                want = want.astype(dtype)
            assert value.dtype == want.dtype and np.array_equal(value, want), name
            names.add(name)
        assert names == set(stored)


def test_each_device_holds_exactly_its_block_of_a_sharded_parameter(ckpt, f32_model):
    mesh = make_mesh(MeshSpec.parse("data=1,expert=4,tensor=2"))
    sharded, _ = load_model(ckpt, dtype=jnp.float32, mesh=mesh, progress=False)
    whole = _params(f32_model)
    split_somewhere = 0
    for path, var in _params(sharded).items():
        for got, full in zip(jax.tree.leaves(var.get_value()), jax.tree.leaves(whole[path].get_value())):
            full = np.asarray(full)
            split_somewhere += not got.sharding.is_fully_replicated
            for shard in got.addressable_shards:
                assert np.array_equal(np.asarray(shard.data), full[shard.index]), (path, shard.device)
    assert split_somewhere > 10  # experts and heads really were split


def test_transform_sees_each_parameter_once_in_its_final_sharding_and_its_result_is_kept(ckpt, f32_model):
    mesh = make_mesh(MeshSpec.parse("data=1,expert=8,tensor=1"))
    seen = []
    lock = threading.Lock()

    def transform(path, value):
        with lock:
            seen.append((path, value))
        return value * 2 if path == ("norm",) else value

    model, _ = load_model(ckpt, dtype=jnp.float32, mesh=mesh, progress=False, transform=transform)
    params = _params(model)
    assert sorted(p for p, _ in seen) == sorted(params)
    for path, value in seen:
        placed = params[path].get_value()
        for leaf, final in zip(jax.tree.leaves(value), jax.tree.leaves(placed)):
            assert isinstance(leaf, jax.Array) and leaf.sharding == final.sharding
            assert leaf is final or path == ("norm",)
    experts = [v for p, v in seen if isinstance(v, Int4Weight)]
    assert experts and all(not w.packed.sharding.is_fully_replicated for w in experts)
    assert np.array_equal(np.asarray(params[("norm",)].get_value()),
                          2 * np.asarray(_params(f32_model)[("norm",)].get_value()))


@pytest.mark.parametrize("platform, stored, dtype, on_host", [
    ("cpu", ml_dtypes.bfloat16, np.float32, True),  # the host is the device: convert while copying
    ("gpu", ml_dtypes.bfloat16, np.float32, False),  # widening: move bf16, convert on the device
    ("tpu", np.float32, ml_dtypes.bfloat16, True),  # narrowing: convert first, move half the bytes
    ("gpu", ml_dtypes.bfloat16, ml_dtypes.bfloat16, True),  # nothing to convert
])
def test_conversions_happen_where_fewer_bytes_move(platform, stored, dtype, on_host):
    assert convert_on_host(platform, np.dtype(stored), np.dtype(dtype)) is on_host


def test_blocks_in_flight_stay_within_the_byte_budget_and_an_oversize_block_goes_alone():
    budget = _ByteBudget(10)
    peaks, lock = [], threading.Lock()

    def hold(n):
        with budget.hold(n):
            with lock:
                peaks.append((n, budget.used))
            time.sleep(0.02)

    threads = [threading.Thread(target=hold, args=(n,)) for n in (4, 4, 4, 15, 4, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 0
    assert all(used <= 10 for n, used in peaks if n <= 10)
    assert (15, 15) in peaks  # the oversize block waited until it was alone


def _raw_file(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_bytes(b"\x01\x02"), "2 bytes, shorter than the 8-byte header length"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1 << 20) + b"{}"), "header length 1048576 does not fit"),
    (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{nope"), "header is not JSON"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
     "bad header entry for tensor 'w'"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     r"tensor 'w' spans 8 bytes, but F32 \[3\] needs 12"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(12)),
     "tensor 'w' ends at byte 86, past the end of the 82-byte file"),
])
def test_safetensors_files_that_do_not_fit_their_header_are_named(tmp_path, make, why):
    make(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=rf"x\.safetensors: not a readable safetensors file, truncated or "
                                              rf"corrupt \({why}"):
        SafetensorsFile(str(tmp_path / "x.safetensors"))


def test_a_slice_is_copied_out_and_converted_in_one_step(tmp_path):
    w = np.arange(48, dtype=np.float32).reshape(6, 8).astype(ml_dtypes.bfloat16)
    save_file({"pad": np.zeros(3, np.int8), "w": w}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    out = np.full((2, 4), -1, np.float32)
    f.copy_into("w", out, lambda t: t[2:4, 1:5])
    assert np.array_equal(out, w[2:4, 1:5].astype(np.float32))
    f.close()


@pytest.mark.parametrize("select, shape", [
    (None, (6, 8)),  # the whole tensor
    (lambda t: t[2:5], (3, 8)),  # leading rows: one contiguous run of bytes, read with pread
    (lambda t: t.reshape(3, 2, 8)[:, 1], (3, 8)),  # every other row: strided, copied from the mapping
    (lambda t: t.reshape(2, 3, 8)[1:], (1, 3, 8)),  # a reshape, then rows
])
def test_contiguous_and_strided_views_read_the_same_bytes(tmp_path, select, shape):
    w = np.random.default_rng(0).normal(size=(6, 8)).astype(ml_dtypes.bfloat16)
    save_file({"pad": np.zeros(5, np.int8), "w": w}, str(tmp_path / "x.safetensors"))  # w at an odd offset
    with contextlib.closing(SafetensorsFile(str(tmp_path / "x.safetensors"))) as f:
        out = np.zeros(shape, ml_dtypes.bfloat16)
        f.copy_into("w", out, select)
    want = w if select is None else select(w)
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))


def test_a_file_cut_short_while_read_is_named(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(path))
    with contextlib.closing(SafetensorsFile(str(path))) as f:
        os.truncate(path, os.path.getsize(path) - 100)
        with pytest.raises(CheckpointError, match="the file ends before tensor 'w' does"):
            f.copy_into("w", np.zeros((64, 64), np.float32))


def _smaps_entry(address: int) -> dict:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= address < hi:
                fields = {}
                for field in lines[i + 1:]:
                    if "-" in field.split()[0] and ":" not in field.split()[0]:
                        break
                    key, _, value = field.partition(":")
                    fields[key] = value.strip()
                return fields
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_page_size_chooser_measures_each_kind_once_then_keeps_the_cheaper():
    mib = 1 << 20
    chooser = PageSizeChooser(trial_bytes=4 * mib)
    # Trials are handed out in whole huge pages, alternating, even to ranges still in flight.
    assert chooser.next_range(3 * mib) == ("huge", 3 * mib)
    assert chooser.next_range(64 * mib) == ("small", 4 * mib)
    assert chooser.next_range(64 * mib) == ("huge", 2 * mib)  # what the first range left of huge's trial
    chooser.record("small", 4 * mib, 0.004)
    assert chooser.next_range(64 * mib) == ("small", 64 * mib)  # huge not measured yet: the measured kind
    chooser.record("huge", 5 * mib, 0.050)
    assert chooser.next_range(64 * mib) == ("small", 64 * mib)  # 1 ns/B against 10 ns/B
    chooser.record("small", 64 * mib, 1.0)  # the machine changed: small now costs ~15 ns/B overall
    assert chooser.next_range(8 * mib) == ("huge", 8 * mib)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc/self/smaps needed")
def test_large_host_blocks_are_faulted_in_on_both_page_sizes_and_become_cpu_arrays_without_a_copy():
    mib = 1 << 20
    chooser = PageSizeChooser(trial_bytes=4 * mib)
    big = new_host_array((6 * mib + 12345, 2), np.uint8, chooser)  # not a whole number of huge pages
    small = new_host_array((1000,), np.float32, chooser)
    assert big.ctypes.data % HUGE_PAGE == 0 and small.ctypes.data % XLA_CPU_ALIGNMENT == 0
    # The first 4 MiB were advised for huge pages, the next 4 MiB not, and all of it is resident.
    head, middle = _smaps_entry(big.ctypes.data), _smaps_entry(big.ctypes.data + 5 * mib)
    assert "hg" in head["VmFlags"].split() and "nh" in middle["VmFlags"].split()
    # ... and the remaining 6 MiB (whole huge pages) went to whichever measured cheaper.
    assert sorted(chooser.bytes.values()) == [4 * mib, 10 * mib]
    assert int(head["Rss"].split()[0]) * 1024 >= 4 * mib
    assert "hg" not in _smaps_entry(small.ctypes.data)["VmFlags"].split()  # small blocks: ordinary pages
    big.fill(7)
    cpu = jax.devices("cpu")[0]
    for block in (big, small):
        array = jax.device_put(block, cpu)
        assert array.unsafe_buffer_pointer() == block.ctypes.data  # XLA adopted the buffer: one copy in all
    assert int(jax.device_put(big, cpu)[-1, -1]) == 7
    assert new_host_array((0, 4), np.float32).shape == (0, 4)


def test_written_shards_are_numbered_with_their_count_and_nothing_partial_remains(tmp_path):
    tensors = [(f"t{i}", np.full(256, i, np.float32)) for i in range(5)]
    export.write_checkpoint(tmp_path, TINY, tensors, max_shard_bytes=1024)  # two tensors a shard
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if f.endswith(".safetensors")] == [f"model-0000{k}-of-000003.safetensors"
                                                                for k in (1, 2, 3)]
    assert not [f for f in files if "partial" in f]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["t4"] == "model-00003-of-000003.safetensors"
    assert np.array_equal(load_file(str(tmp_path / index["t4"]))["t4"].astype(np.float32), tensors[4][1])


def test_a_directory_converted_in_an_older_format_is_refused_with_what_to_do(tmp_path):
    from kimi_jax.convert import MARKER, load_converted

    (tmp_path / MARKER).write_text(json.dumps({"format": "kimi_jax-orbax", "version": 1}))
    with pytest.raises(KimiError, match="converted in format version 1, but this kimi_jax reads version 2; "
                                        "convert the original checkpoint again"):
        load_converted(str(tmp_path), CFG)
