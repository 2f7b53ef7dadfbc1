"""benchmarks/chunk_dq_probe.py on CPU (interpret mode, a tiny GVA layer with documents, two pieces): its formulas
for the head-summed dq and dk and the chunk-local rates' gradient agree with autodiff of the XLA path, and its
kernels (dQ with the gradient's row terms, dK with b_r, the states walk) with those formulas. The timing rows
need a GPU."""

import json

from benchmarks import chunk_dq_probe


def test_formulas_and_kernel_checks(tmp_path):
    args = ["--check-t", "512", "--heads", "4", "--dk", "32", "--dv", "16", "--docs", "3", "--pieces", "2",
            "--interpret", "--out", str(tmp_path)]
    assert chunk_dq_probe.main(args) == 0
    record = json.loads((tmp_path / "chunk_dq_probe.json").read_text())
    assert record["command"].startswith("python3 -m benchmarks.chunk_dq_probe --check-t 512")
    formulas, kernels = record["rows"]
    # float32 formulas against float32 autodiff: 5e-8 to 6e-7 measured; a missing or misplaced term is O(0.1)
    assert max(formulas["dq"], formulas["dk"], formulas["ds_f32_states"]) < 1e-5
    # the rates' gradient with both chunk states rounded to bf16: 8.7e-4 measured (9.4e-4 at T 16K)
    assert 1e-5 < formulas["ds_bf16_states"] < 3e-3
    # the kernels against the formulas on the same bf16 states. dq and dk round the heads' summed scores to bf16:
    # 1.5e-3 measured; the row terms are float32 throughout: a, b 1.1e-7, the net sums of W 0 (interpreted, the
    # formula's own float32 operations), the rates' gradient assembled from them 1.3e-7
    assert kernels["dq"] < 4e-3 and kernels["dk"] < 4e-3
    assert max(kernels["a"], kernels["b"]) < 1e-5 and max(kernels["net"], kernels["ds"]) < 1e-4
    # the states walk's bf16 states (and its bf16 k_side k rows) against the float32 scan: 2.2e-3 measured
    assert kernels["states_walk"] < 5e-3
