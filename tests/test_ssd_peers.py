"""CPU checks of benchmarks/ssd_peers_gpu.py's plumbing (Mamba-2's SSD core beside jla and fla): flags and bad
input, one worker per contender group, rows merged into the table, ours (impl xla) and jla's ssd_core (its
chunked path on CPU, when jax-linear-attention is installed) against the fp32 reference at a tiny grouped shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import ssd_peers_gpu
from tests.util import needs_jla

# Tiny Mamba-2 layout: 4 value heads of P 16 reading one group of N 32, 3 documents.
TINY = ["--t", "256", "--heads", "4", "--groups", "1", "--dk", "32", "--dv", "16", "--docs", "3", "--iters", "1",
        "--reps", "1"]
# Measured on CPU at TINY (seed 0): o, dq, dk, dv 1.63e-3 to 1.67e-3 for ours and jla alike (the bf16 rounding of
# an fp32-exact result); d_rates 0 for ours (float32 throughout, as the reference), 5.0e-7 for jla.
BF16_ERR = 4e-3
RATES_ERR = 1.5e-6


def test_flags():
    args = ssd_peers_gpu.parse_args([])
    assert (args.batch, args.t, args.heads, args.groups, args.dk, args.dv, args.docs) == (1, 65536, 64, 1, 128, 64,
                                                                                          16)
    assert ssd_peers_gpu.workers(args) == ["lasp_jax:auto", "jla", "fla"]
    args = ssd_peers_gpu.parse_args(["--impls", "xla,pallas_triton", "--peers", "fla"])
    assert ssd_peers_gpu.workers(args) == ["lasp_jax:xla", "lasp_jax:pallas_triton", "fla"]
    assert ssd_peers_gpu.workers(ssd_peers_gpu.parse_args(["--impls", "", "--peers", "fla,jla"])) == ["jla", "fla"]
    assert ssd_peers_gpu.parse_args(["--batch", "2", "--docs", "4", "--peers", "jla"]).batch == 2


@pytest.mark.parametrize("bad, message", [
    (["--heads", "6", "--groups", "4"], "--heads 6 is not a multiple of --groups 4"),
    (["--peers", "mamba_ssm"], "unknown peers ['mamba_ssm']"),
    (["--t", "8", "--docs", "9"], "--docs 9 is more documents than --t 8"),
    (["--dk", "0"], "--dk must be a positive integer"),
    (["--reps", "0"], "--reps must be a positive integer"),
    (["--batch", "2"], "with --docs > 1 it needs --batch 1"),
    (["--jla-impl", "triton"], "invalid choice: 'triton'"),
])
def test_bad_flags(bad, message, capsys):
    with pytest.raises(SystemExit):
        ssd_peers_gpu.parse_args(bad)
    assert message in capsys.readouterr().err


def test_inputs_are_grouped_and_reproducible():
    args = ssd_peers_gpu.parse_args(TINY)
    (q, k, v, do), rates, ids = ssd_peers_gpu.inputs(args)
    assert q.shape == k.shape == (1, 256, 1, 32) and v.shape == do.shape == (1, 256, 4, 16)
    assert rates.shape == (1, 256, 4) and rates.dtype == np.float32 and ids.shape == (1, 256) and ids[0, -1] == 2
    (q2, _, v2, _), rates2, _ = ssd_peers_gpu.inputs(args)
    assert (np.asarray(q) == np.asarray(q2)).all() and (np.asarray(v) == np.asarray(v2)).all()
    assert (rates == rates2).all()
    assert not np.allclose(np.asarray(q, np.float32), np.asarray(k, np.float32))
    assert ssd_peers_gpu.inputs(ssd_peers_gpu.parse_args(TINY + ["--docs", "1"]))[2] is None


def test_cu_seqlens():
    ids = np.array([[0, 0, 1, 1, 1, 2]], np.int32)
    assert ssd_peers_gpu.cu_seqlens(ids).tolist() == [0, 2, 5, 6]
    assert ssd_peers_gpu.cu_seqlens(None) is None
    with pytest.raises(ValueError, match="one row"):
        ssd_peers_gpu.cu_seqlens(np.zeros((2, 6), np.int32))


def _worker(name, tmp_path, *flags):
    """The rows one worker writes, run in this process."""
    rows = tmp_path / f"{name}.jsonl"
    ssd_peers_gpu.main(TINY + list(flags) + ["--worker", name, "--rows", str(rows)])
    return [json.loads(line) for line in rows.read_text().splitlines()]


def _check_errors(row):
    errors = row["errors"]
    assert set(errors) == {"o", "dq", "dk", "dv", "ds", "max"}
    assert all(1e-4 < errors[n] < BF16_ERR for n in ("o", "dq", "dk", "dv"))
    assert errors["ds"] < RATES_ERR


def test_ours_against_the_reference(tmp_path):
    device, row = _worker("lasp_jax:xla", tmp_path)
    assert device == {"worker": "lasp_jax:xla", "device": "cpu"}
    assert row["contender"] == "lasp_jax xla" and row["resolved"] == "xla"
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    _check_errors(row)


@needs_jla
def test_jla_against_the_reference(tmp_path):
    """jla's ssd_core with impl auto: on CPU it repeats B, C per head and runs its chunked simple GLA."""
    _, row = _worker("jla", tmp_path)
    assert row["contender"] == "jla mamba2_fused.ssd_core" and row["path"].startswith("no Mosaic GPU kernel")
    _check_errors(row)


def test_render_merges_rows():
    meta = {"date": "d", "versions": {}, "command": "c", "isolation": ssd_peers_gpu.ISOLATION, "timing": "t",
            "error": "e", "devices": {}, "shape": dict(ssd_peers_gpu.DIMS)}
    errors = {"o": 1e-3, "dq": 2e-3, "dk": 3e-3, "dv": 4e-3, "ds": 5e-3}
    rows = [{"contender": "lasp_jax auto", "resolved": "pallas_mosaic", "form": "f", "fwd_ms": 2.0,
             "fwd_bwd_ms": 8.0, "errors": errors},
            {"contender": "jla mamba2_fused.ssd_core", "path": "p", "form": "f", "fwd_ms": 3.0, "fwd_bwd_ms": 10.0,
             "errors": errors},
            {"contender": "fla chunk_simple_gla", "form": "f", "error": "ImportError: no torch"}]
    table = ssd_peers_gpu.render(meta, rows)
    assert "| lasp_jax auto | pallas_mosaic | f | 2.000 | 8.000 | 1.00x / 1.00x |" in table
    assert "| jla mamba2_fused.ssd_core | p | f | 3.000 | 10.000 | 1.50x / 1.25x | 1.00e-03 / 2.00e-03 / 3.00e-03 / " \
           "4.00e-03 / 5.00e-03 |" in table
    assert "| fla chunk_simple_gla |  | f | error: ImportError: no torch | | | |" in table
    assert "process of its own" in table and "T 65536, H 64 value heads, G 1 groups" in table


@pytest.mark.slow
def test_side_by_side(tmp_path):
    """Two workers, each in a process of its own, merged into one table: our xla measured, fla (no CUDA here)
    reported as its row's error."""
    ssd_peers_gpu.main(TINY + ["--impls", "xla", "--peers", "fla", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "ssd_peers_gpu.json").read_text())
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == {"lasp_jax xla", "fla chunk_simple_gla"}
    assert "error" in rows["fla chunk_simple_gla"] and "fwd_ms" not in rows["fla chunk_simple_gla"]
    assert rows["lasp_jax xla"]["errors"]["max"] < BF16_ERR
    assert set(result["meta"]["devices"]) == {"lasp_jax:xla", "fla"}
    assert result["meta"]["shape"]["heads"] == 4
    table = (tmp_path / "ssd_peers_gpu.md").read_text()
    assert "| lasp_jax xla | xla |" in table and "1.00x / 1.00x" in table and "--peers fla" in table
