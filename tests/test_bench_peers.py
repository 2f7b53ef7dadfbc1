"""CPU checks of the side-by-side GPU benchmarks' plumbing: flags, one process per contender group, rows merged
into one table, a failing contender or worker reported without hiding the others. Tiny shapes, impl xla (and jla's
chunked op when jax-linear-attention is installed) stand in for the GPU kernels."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from benchmarks import bench_lasp_gpu, bench_ops_gpu, measure
from lasp_jax.ops import rms_norm
from tests.util import needs_jla

# A bf16 result against the fp32 reference on CPU measured 1.65e-3 to 1.68e-3 (o, dq, dk, dv; 1x128x2x32 and
# 1x256x2x64); a wrong kernel lands far above.
BF16_ERR = 4e-3


def test_ops_flags():
    args = bench_ops_gpu.parse_args([])
    assert args.shape_list == [(1, 16384, 16, 128), (1, 65536, 16, 128), (1, 262144, 16, 128), (8, 8192, 32, 128)]
    assert bench_ops_gpu.workers(args) == ["lasp_jax:pallas_mosaic", "jla", "torch:fla+lasp"]
    args = bench_ops_gpu.parse_args(["--impls", "xla,pallas_triton", "--peers", "lasp"])
    assert bench_ops_gpu.workers(args) == ["lasp_jax:xla", "lasp_jax:pallas_triton", "torch:lasp"]
    assert bench_ops_gpu.parse_args(["--decays", "constant,tokens,tokens/16"]).decay_list == [
        "constant", "tokens", "tokens/16"]
    for bad in (["--peers", "flash"], ["--shapes", "1x16x2"], ["--shapes", "1x0x2x4"], ["--scale", "0"],
                ["--decays", "tokens/0"], ["--decays", "constant/4"], ["--decays", "gated"]):
        with pytest.raises(SystemExit):
            bench_ops_gpu.parse_args(bad)


def test_lasp_flags():
    args = bench_lasp_gpu.parse_args(["--dim", "64"])
    assert args.scale == 0.125 and args.counts == [] and args.peers == "jla"
    for bad in (["--peers", "fla"], ["--gpus", "two"], ["--decays", "tokens/x"]):
        with pytest.raises(SystemExit):
            bench_lasp_gpu.parse_args(bad)


def test_failed_worker_gives_an_error_row():
    """A worker process that exits non-zero gives a row naming it; the next worker still runs."""
    got = []
    assert measure.run_workers("json.tool", ["--no-such-flag"], ["a", "b"], lambda name, rows: got.append(rows))
    assert got == [[{"worker": w, "error": "worker exited with 2 (its log is above)"}] for w in ("a", "b")]


def test_workers_compile_the_reference_once(monkeypatch):
    """The second worker loads the fp32 reference's program from the run's shared compilation cache (the
    1 s threshold lowered: this tiny shape compiles faster)."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    got = []
    assert measure.run_workers("tests.test_bench_peers", [], ["reference", "reference"],
                               lambda name, rows: got.extend(rows))
    assert got[0]["compiles"] > 0 and got[0]["cache_hits"] == 0
    assert got[1]["cache_hits"] == got[1]["compiles"] == got[0]["compiles"]
    assert got[0]["o"] == got[1]["o"]


def test_sigterm_keeps_the_rows_so_far():
    """SIGTERM (a step's time limit) while a worker runs: its rows so far are kept, no further worker starts."""
    got = []
    complete = measure.run_workers("tests.test_bench_peers", [], ["stops its parent", "never started"],
                                   lambda name, rows: got.append((name, rows)))
    assert not complete
    assert got == [("stops its parent", [{"contender": "first"},
                                         {"worker": "stops its parent", "error": "stopped by SIGTERM while running"}])]


@pytest.mark.slow
def test_ops_side_by_side(tmp_path):
    """Two workers in their own processes: xla measured, an unknown impl reported as its row's error."""
    bench_ops_gpu.main(["--shapes", "1x128x2x32", "--impls", "xla,no_such_impl", "--peers", "", "--iters", "1",
                        "--reps", "1", "--copy-mib", "8", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "ops_gpu.json").read_text())
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == {"lasp_jax xla", "lasp_jax no_such_impl"}
    assert rows["lasp_jax xla"]["scale"] == 32 ** -0.5
    assert rows["lasp_jax xla"]["fwd_ms"] > 0 and rows["lasp_jax xla"]["fwd_bwd_ms"] > 0
    assert 1e-4 < rows["lasp_jax xla"]["errors"]["max"] < BF16_ERR
    assert "unknown impl" in rows["lasp_jax no_such_impl"]["error"]
    assert set(result["meta"]["devices"]) == {"lasp_jax:xla", "lasp_jax:no_such_impl"}
    assert result["meta"]["copy_GBps"] > 0  # measured by the first worker, whoever runs
    assert all(r["wall_s"] > 0 and r["reference_s"] > 0 for r in rows.values())
    table = (tmp_path / "ops_gpu.md").read_text()
    assert "process of its own" in table and "| 1x128x2x32 | constant | lasp_jax xla |" in table
    assert "nan" not in table and "not measured" not in table


@pytest.mark.slow
@needs_jla
def test_ops_with_jla(tmp_path):
    """jla's simple_gla (its chunked op on CPU) beside ours: same inputs, same error, a ratio row."""
    bench_ops_gpu.main(["--shapes", "1x128x2x32", "--impls", "xla", "--peers", "jla", "--jla-impl", "chunked",
                        "--iters", "1", "--reps", "1", "--copy-mib", "8", "--out", str(tmp_path)])
    rows = {r["contender"]: r for r in json.loads((tmp_path / "ops_gpu.json").read_text())["rows"]}
    ours, jla = rows["lasp_jax xla"], rows["jla simple_gla (chunked)"]
    assert jla["errors"]["max"] < BF16_ERR
    assert jla["errors"]["o"] == pytest.approx(ours["errors"]["o"], rel=0.2)
    assert "| 1x128x2x32 | constant | xla | " in (tmp_path / "ops_gpu.md").read_text()


def test_decay_inputs():
    """Per-token rates in [0.001, 0.1], the same bits for a seed; N documents per row with N - 1 starts."""
    rates, ids = measure.decay_inputs((2, 64, 3, 8), "tokens/5", seed=0)
    assert rates.shape == (2, 64, 3) and 0.001 <= rates.min() and rates.max() <= 0.1
    assert ids.shape == (2, 64) and (ids[:, 0] == 0).all() and (ids[:, -1] == 4).all()
    assert (np.diff(ids, axis=1) >= 0).all()
    again, _ = measure.decay_inputs((2, 64, 3, 8), "tokens/5", seed=0)
    assert (again == rates).all()
    slopes, none = measure.decay_inputs((2, 64, 3, 8), "constant")
    assert slopes.shape == (3,) and none is None


@pytest.mark.slow
def test_ops_per_token_documents(tmp_path):
    """Per-token decay over packed documents: the rates' cotangent is measured too (ds), within bf16 error."""
    bench_ops_gpu.main(["--shapes", "1x128x2x32", "--impls", "xla", "--peers", "", "--decays", "tokens/3",
                        "--iters", "1", "--reps", "1", "--copy-mib", "8", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "ops_gpu.json").read_text())["rows"]
    assert row["decay"] == "tokens/3" and set(row["errors"]) == {"o", "dq", "dk", "dv", "ds", "max"}
    assert 1e-4 < row["errors"]["max"] < BF16_ERR


@pytest.mark.slow
def test_lasp_side_by_side(tmp_path):
    """Our strategies on 2 CPU devices in a worker process, the peer's file merged into the table."""
    (tmp_path / "lasp_peer.json").write_text(json.dumps(
        {"run": "2 GPUs LASP lasp_fuse_parallel, T=512", "gpus": 2, "fwd_ms": 8.0, "fwd_bwd_ms": 20.0}))
    peers = "jla" if importlib.util.find_spec("jla") else ""
    bench_lasp_gpu.main(["--per-gpu", "256", "--heads", "2", "--dim", "32", "--gpus", "2", "--impl", "xla",
                         "--peers", peers, "--jla-impl", "chunked", "--iters", "1", "--reps", "1",
                         "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lasp_gpu.json").read_text())["rows"]
    ours = [r for r in rows if r["framework"] == "lasp_jax"]
    assert [r["gpus"] for r in ours] == [1, 2, 2, 2]
    assert all(r["errors"]["max"] < BF16_ERR for r in ours)
    assert rows[-1]["framework"] == "LASP"
    if peers:
        assert [r["gpus"] for r in rows if r["framework"] == "jla"] == [1, 2]
    table = (tmp_path / "lasp_gpu.md").read_text()
    ring = next(line for line in table.splitlines() if "lasp_attention ring" in line)
    assert f"{20.0 / ours[1]['fwd_bwd_ms']:.2f}x" in ring
    assert os.path.exists(tmp_path / "lasp_gpu.png")


if __name__ == "__main__":  # a worker of the run_workers tests
    rows_file = sys.argv[sys.argv.index("--rows") + 1]
    if sys.argv[sys.argv.index("--worker") + 1] == "reference":  # the reference's compile: loaded or not
        import jax

        from lasp_jax.ops import tnl_slopes

        events = []
        jax.monitoring.register_event_listener(lambda event, **_: events.append(event.rsplit("/", 1)[-1]))
        inputs = measure.normal_inputs((1, 64, 2, 16))
        del events[:]
        o, _ = measure.fp32_reference(*inputs, tnl_slopes(2), 0.25)
        measure.append_row(rows_file, {"compiles": events.count("compile_requests_use_cache"),
                                       "cache_hits": events.count("cache_hits"), "o": float(o.sum())})
    else:  # one row, then its parent is stopped
        measure.append_row(rows_file, {"contender": "first"})
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(60)


def test_shapes_and_configs_parse_by_their_names():
    """measure.parse_shapes takes as many dims as its names spell; parse_configs builds a Config per entry (a bool
    field 0 or 1) and config_label writes the entry back; bad entries name the fields."""
    assert measure.parse_shapes("65536x2048,8x4", names="TxD") == [(65536, 2048), (8, 4)]
    with pytest.raises(ValueError, match="is not TxD with 2 positive integers"):
        measure.parse_shapes("1x65536x2048", names="TxD")
    fields = ("fwd_block", "bwd_block", "elems_per_warp", "num_stages", "xla_forward")
    config, = measure.parse_configs("4096:2048:128:3:1", rms_norm.Config, fields)
    assert config == rms_norm.Config(fwd_block=4096, bwd_block=2048, elems_per_warp=128, num_stages=3,
                                     xla_forward=True)
    assert measure.config_label(config, fields) == "4096:2048:128:3:1"
    with pytest.raises(ValueError, match="xla_forward 0 or 1"):
        measure.parse_configs("4096:2048:128:3:2", rms_norm.Config, fields)
    with pytest.raises(ValueError, match="is not fwd_block:bwd_block"):
        measure.parse_configs("4096:0:128:3:1", rms_norm.Config, fields)


def test_markdown_table_leaves_a_failed_rows_timings_empty():
    """measure.markdown_table: a cell whose keys the row lacks is empty, the row's error goes to the note."""
    columns = (("impl", lambda r: r["impl"]), ("fwd ms", lambda r: f"{r['fwd_ms']:.3f}"))
    text = measure.markdown_table([{"impl": "xla", "fwd_ms": 0.1234}, {"impl": "k", "error": "E: bad"}], columns)
    assert text.splitlines() == ["| impl | fwd ms | note |", "|---|---|---|", "| xla | 0.123 |  |",
                                 "| k |  | E: bad |"]
