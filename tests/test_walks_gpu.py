"""benchmarks/walks_gpu.py on CPU: it runs its contenders through vjp.attend_tokens at a tiny Mamba-2 layout, checks
each against the float32 XLA run, records a row per contender, and gives a contender that cannot run here (the
compiled Mosaic walks) a row with its reason instead of numbers."""

import json

import pytest

from benchmarks import walks_gpu


def test_rows_and_table(tmp_path):
    args = ["--t", "256", "--heads", "4", "--dk", "32", "--dv", "16", "--docs", "3", "--impls", "xla,paired",
            "--max-piece-len", "128,256", "--iters", "1", "--reps", "1", "--out", str(tmp_path)]
    assert walks_gpu.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "walks_gpu.jsonl").read_text().splitlines()]
    assert rows[0]["provenance"]["command"].startswith("python3 -m benchmarks.walks_gpu --t 256")
    xla, paired, xla_256, _ = rows[1:]
    assert [r["max_piece_len"] for r in rows[1:]] == [128, 128, 256, 256]
    assert xla_256["impl"] == "xla" and xla_256["max_err"] == xla["max_err"]  # XLA cuts no pieces
    assert xla["impl"] == "xla" and xla["fwd_ms"] > 0 and xla["fwd_bwd_ms"] > 0
    assert 0 < xla["max_err"] < 4e-3  # bf16 outputs against the float32 run: 1.7e-3 measured; a wrong decay is O(1)
    assert set(xla["errors"]) == {"o", "dq", "dk", "dv", "ds", "max"}
    assert paired["impl"] == "paired" and "fwd_ms" not in paired and paired["error"]
    table = (tmp_path / "walks_gpu.md").read_text()
    assert "| 256 | 4 | 1 | 32 | 16 | 3 | xla | 128 |" in table and "| paired | 256 | | | |" in table


def test_contenders_take_config_fields():
    walks = walks_gpu.contender("unpaired:stages=2:approx_math=0")
    assert (walks.config.pair_heads, walks.config.stages, walks.config.approx_math) == (False, 2, False)
    assert walks_gpu.contender("paired").config.pair_heads is True
    for bad, match in (("paired:stage=2", "not field=integer"), ("paired:stages=x", "not field=integer"),
                       ("triton", "unknown contender"), ("xla:stages=2", "takes no Config fields")):
        with pytest.raises(ValueError, match=match):
            walks_gpu.contender(bad)


def test_bad_piece_lengths_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        walks_gpu.main(["--max-piece-len", "512,abc", "--out", str(tmp_path)])
    assert "--max-piece-len takes positive integers" in capsys.readouterr().err
