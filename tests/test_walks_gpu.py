"""benchmarks/walks_gpu.py on CPU: it runs its contenders through vjp.attend_tokens at a tiny Mamba-2 layout, checks
each against the float32 XLA run, records a row per contender with the pieces its plan cuts, and gives a contender
that cannot run here (the compiled Mosaic walks) a row with its reason instead of numbers."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import walks_gpu


def test_rows_and_table(tmp_path):
    args = ["--t", "256", "--heads", "4", "--dk", "32", "--dv", "16", "--docs", "3", "--impls", "xla,paired",
            "--iters", "1", "--reps", "1", "--out", str(tmp_path)]
    assert walks_gpu.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "walks_gpu.jsonl").read_text().splitlines()]
    assert rows[0]["provenance"]["command"].startswith("python3 -m benchmarks.walks_gpu --t 256")
    xla, paired = rows[1:]
    assert xla["pieces"] is None and paired["pieces"] == 1  # T = 256: four chunks of 64, Config.min_piece_chunks
    assert xla["impl"] == "xla" and xla["fwd_ms"] > 0 and xla["fwd_bwd_ms"] > 0
    assert 0 < xla["max_err"] < 4e-3  # bf16 outputs against the float32 run: 1.7e-3 measured; a wrong decay is O(1)
    assert set(xla["errors"]) == {"o", "dq", "dk", "dv", "ds", "max"}
    assert paired["impl"] == "paired" and "fwd_ms" not in paired and paired["error"]
    table = (tmp_path / "walks_gpu.md").read_text()
    assert "| 256 | 4 | 1 | 32 | 16 | 3 | xla |  | " in table and "| paired | 1 | | | | ValueError" in table


def test_contenders_take_config_fields():
    walks = walks_gpu.contender("unpaired:stages=2:approx_math=0")
    assert (walks.config.pair_heads, walks.config.stages, walks.config.approx_math) == (False, 2, False)
    assert walks_gpu.contender("paired").config.pair_heads is True
    for bad, match in (("paired:stage=2", "not field=integer"), ("paired:stages=x", "not field=integer"),
                       ("triton", "unknown contender"), ("xla:stages=2", "takes no Config fields")):
        with pytest.raises(ValueError, match=match):
            walks_gpu.contender(bad)


def test_piece_count_is_the_plans():
    """At a Mamba-2 1.3B layer (T = 64K, 64 value heads, one group): the Triton plan's 4 pieces of 16K for the
    Mosaic walks (which take pallas_triton's plan under their triton Config) and the Triton kernels alike; XLA
    cuts none."""
    q = jax.ShapeDtypeStruct((1, 65536, 1, 128), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 65536, 64, 64), jnp.bfloat16)
    got = {name: walks_gpu.piece_count(walks_gpu.contender(name), q, v)
           for name in ("paired", "unpaired:stages=2", "pallas_triton", "xla")}
    assert got == {"paired": 4, "unpaired:stages=2": 4, "pallas_triton": 4, "xla": None}
