"""benchmarks/chunk_dq_probe.py on CPU (interpret mode, a tiny GVA layer with documents): its formulas for the
head-summed dq, the per-head row dots and the chunk-local rates' gradient agree with autodiff of the XLA path,
and its kernel with its formula. The timing rows need a GPU."""

import json

from benchmarks import chunk_dq_probe


def test_formulas_and_kernel_checks(tmp_path):
    args = ["--check-t", "512", "--heads", "4", "--dk", "32", "--dv", "16", "--docs", "3", "--interpret",
            "--out", str(tmp_path)]
    assert chunk_dq_probe.main(args) == 0
    record = json.loads((tmp_path / "chunk_dq_probe.json").read_text())
    assert record["command"].startswith("python3 -m benchmarks.chunk_dq_probe --check-t 512")
    formulas, kernel = record["rows"]
    # float32 formulas against float32 autodiff: 6e-8 to 6e-7 measured; a missing or misplaced term is O(0.1)
    assert formulas["dq"] < 1e-5 and formulas["dots"] < 1e-5 and formulas["ds_f32_states"] < 1e-5
    # the same with the states rounded to bf16: 8.7e-4 measured (9.4e-4 at T 16K, 8 heads of 128 x 64)
    assert 1e-5 < formulas["ds_bf16_states"] < 3e-3
    # the kernel's bf16 operands against the float32 formula: 1.5e-3 (dq) and 6.0e-4 (dots) measured
    assert kernel["dq"] < 4e-3 and kernel["dots"] < 2e-3
