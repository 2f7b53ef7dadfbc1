"""benchmarks.peer_train_jla on CPU: its flags, the batch it feeds jla, our FLOPs for its MFU, and (where jla is
installed) one row from jla's tiny Mamba-2 step."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from benchmarks import bench_train_gpu, peer_train_jla
from tests.util import needs_jla
from train.metrics import flops_per_token


def test_flags():
    args = peer_train_jla.parse_args([])
    assert (args.preset, args.ours, args.tokens, args.documents, args.remat, args.profile) == (
        "mamba2-1p3b", "mamba2-1.3b", 65536, 16, "full", False)


@pytest.mark.parametrize(("bad", "message"), [
    (["--tokens", "1"], "--tokens must be at least 2, got 1"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--documents", "0"], r"--documents must be in \[1, --tokens=65536\], got 0"),
    (["--tokens", "8", "--documents", "9"], r"--documents must be in \[1, --tokens=8\], got 9"),
], ids=["tokens", "steps", "no_documents", "more_documents_than_tokens"])
def test_bad_flags_say_which(bad, message, capsys):
    with pytest.raises(SystemExit):
        peer_train_jla.parse_args(bad)
    assert re.search(message, capsys.readouterr().err)


def test_batch_is_next_token_rows_cut_as_our_benchmark_cuts():
    data = peer_train_jla.batch(64, 5, vocab=100)
    ids, labels, segments = (np.asarray(data[k]) for k in ("input_ids", "labels", "segment_ids"))
    assert ids.shape == labels.shape == segments.shape == (1, 1, 64)
    np.testing.assert_array_equal(ids[..., 1:], labels[..., :-1])
    np.testing.assert_array_equal(segments[0], bench_train_gpu.segment_ids(1, 64, 5))
    assert len(np.unique(segments)) == 5 and ids.max() < 100


def test_our_flops_are_the_benchmarks():
    """Our MFU's FLOPs: bench_train_gpu's model (the vocabulary rounded up to 128: 50304) and convention."""
    mcfg = peer_train_jla.our_model("mamba2-1.3b")
    assert mcfg.vocab_size == 50304
    got = peer_train_jla.our_flops_per_token(mcfg, 65536)
    # 1,343,275,008 matmul parameters: bench_train_gpu's count on the H200 (train_gpu_h200_s16.jsonl).
    assert got == flops_per_token(mcfg, 1_343_275_008, 65536)


@needs_jla
def test_tiny_step_gives_a_row(tmp_path):
    peer_train_jla.main(["--preset", "tiny-mamba2", "--ours", "mamba2-tiny", "--tokens", "128", "--documents", "3",
                         "--steps", "1", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "peer_train_jla.jsonl").read_text())
    assert "error" not in row, row
    assert row["step_s"] > 0 and np.isfinite(row["loss"]) and row["our_flops_per_token"] > 0
