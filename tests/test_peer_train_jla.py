"""benchmarks.peer_train_jla on CPU: its flags, the batch it feeds jla, our FLOPs for its MFU, and (where jla is
installed) one row from jla's tiny Mamba-2 step."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from benchmarks import peer_train_jla
from train.metrics import flops_per_token


def test_flags():
    args = peer_train_jla.parse_args([])
    assert (args.preset, args.ours, args.tokens, args.documents, args.remat) == (
        "mamba2-1p3b", "mamba2-1.3b", 65536, 16, "full")
    for bad in (["--tokens", "1"], ["--steps", "0"], ["--documents", "0"], ["--tokens", "8", "--documents", "9"]):
        with pytest.raises(SystemExit):
            peer_train_jla.parse_args(bad)


def test_batch_is_next_token_rows_with_the_documents_asked_for():
    data = peer_train_jla.batch(64, 5, vocab=100)
    ids, labels, segments = (np.asarray(data[k]) for k in ("input_ids", "labels", "segment_ids"))
    assert ids.shape == labels.shape == segments.shape == (1, 1, 64)
    np.testing.assert_array_equal(ids[..., 1:], labels[..., :-1])
    assert segments[0, 0, 0] == 0 and np.all(np.diff(segments[0, 0]) >= 0) and len(np.unique(segments)) == 5
    assert ids.max() < 100


def test_our_flops_are_the_benchmarks():
    """Our MFU's FLOPs: bench_train_gpu's model (the vocabulary rounded up to 128: 50304) and convention."""
    mcfg = peer_train_jla.our_model("mamba2-1.3b")
    assert mcfg.vocab_size == 50304
    got = peer_train_jla.our_flops_per_token(mcfg, 65536)
    # 1,343,275,008 matmul parameters: bench_train_gpu's count on the H200 (train_gpu_h200_s16.jsonl).
    assert got == flops_per_token(mcfg, 1_343_275_008, 65536)


@pytest.mark.skipif(importlib.util.find_spec("jla") is None,
                    reason="jax-linear-attention (the jla peer, pip install jax-linear-attention==0.1.0) is not "
                           "installed")
def test_tiny_step_gives_a_row(tmp_path):
    peer_train_jla.main(["--preset", "tiny-mamba2", "--ours", "mamba2-tiny", "--tokens", "128", "--documents", "3",
                         "--steps", "1", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "peer_train_jla.jsonl").read_text())
    assert "error" not in row, row
    assert row["step_s"] > 0 and np.isfinite(row["loss"]) and row["our_flops_per_token"] > 0
