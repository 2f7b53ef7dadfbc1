"""The training benchmark (benchmarks/bench_train_gpu.py) on CPU. Its watchdog: a multi-GPU attempt that runs out of
memory on one GPU can leave the others waiting in a collective for ever; it must be killed and counted as out
of memory, and a child that recovers from an out-of-memory warning must not be. Its packed documents, flag
checks, and one whole child step of a Mamba-2 hybrid."""

import sys
import time

import jax
import numpy as np
import pytest

import models
from benchmarks import bench_train_gpu as bench
from models import presets
from train import metrics

COMPILED = "[08:00:01] state built; lowering and compiling the step\n[08:00:40] compiled in 39.0 s\n"
OOM = "W1122 bfc_allocator.cc:598] Allocator (GPU_0_bfc) ran out of memory trying to allocate 107.42GiB\n"
STUCK = "E1122 rendezvous.cc:116] This thread has been waiting for `Acquire clique` for 10 seconds and may be stuck.\n"


@pytest.mark.parametrize(("log", "silent_s", "hung"), [
    (COMPILED + OOM + STUCK, 5, True),  # a peer waits in the collective
    (COMPILED + OOM, 1000, True),  # silence after the error
    (COMPILED + OOM, 5, False),  # not yet
    (OOM + COMPILED, 1000, False),  # a warning the compile recovered from (autotuning), then a long first step
    (COMPILED + OOM + "[08:02:00] 1 GPU(s), 65536 tokens, remat full: building the state\n", 1000, False),
    (COMPILED, 1000, False),
])
def test_hung(log, silent_s, hung):
    assert bench._hung(log, silent_s) is hung


def test_a_hung_child_is_killed_and_counted_as_out_of_memory(tmp_path):
    class Hanging(bench.Children):
        def command(self, phase, n, tokens, remat):
            return [sys.executable, "-c", f"import time; print({COMPILED + OOM + STUCK!r}, flush=True); time.sleep(60)"]

    t0 = time.monotonic()
    args = bench.argparse.Namespace(model="tnl-1b", documents=0, remat_every=1, mamba2_impl="", softmax_impl="",
                                    norm_impl="", conv_impl="", param_axis="")
    record = Hanging(args, [], tmp_path, time.monotonic() + 50, ["0"], {}).run("attempt", 2, 655360, "full")
    assert time.monotonic() - t0 < 30
    assert record["kind"] == "longest" and record["fits"] is False and record["oom"] is True
    assert record["gpus"] == 2 and record["tokens_per_gpu"] == 655360 and record["remat"] == "full"


def test_segment_ids_pack_n_documents_per_row_from_a_fixed_seed():
    ids = bench.segment_ids(3, 1000, 7)
    assert ids.shape == (3, 1000) and ids.dtype == np.int32
    steps = np.diff(ids, axis=1)
    assert (ids[:, 0] == 0).all() and set(np.unique(steps)) == {0, 1} and (ids[:, -1] == 6).all()
    assert len({tuple(np.flatnonzero(row)) for row in steps}) == 3  # each row cut at its own positions
    np.testing.assert_array_equal(bench.segment_ids(3, 1000, 7), ids)
    assert bench.segment_ids(3, 1000, 0) is None


@pytest.mark.parametrize(("flags", "names"), [
    (["--model", "mamba2-1.3c"], "unknown model preset"),
    (["--documents", "9", "--tokens-per-gpu", "8"], "--documents 9"),
    (["--documents", "-1"], "--documents -1"),
])
def test_bad_flags_are_refused_before_any_child_starts(tmp_path, capsys, flags, names):
    with pytest.raises(SystemExit):
        bench.main([*flags, "--out", str(tmp_path)])
    assert names in capsys.readouterr().err
    assert not (tmp_path / "train_gpu.jsonl").exists()


def test_mamba2_hybrid_step_with_documents_on_cpu(tmp_path, monkeypatch):
    """The whole child (state, step, record) for a Mamba-2 hybrid with 3 documents per row, on one CPU device
    (float32 compute): the batch carries the rows' segment_ids, and the record names the model and documents and
    counts the FLOPs with Mamba-2's state (SSM heads x d_state x head dim), not TNL's heads x head dim^2, and the
    softmax layers' within the documents (their attention length, below the row's 128)."""
    batches = []
    close = bench.Step.close
    monkeypatch.setattr(bench.Step, "close", lambda self: (batches.append(jax.device_get(self.batch)), close(self)))
    bench.main(["--model", "mamba2-tiny-hybrid", "--documents", "3", "--steps", "1", "--ce-chunk", "64",
                "--child", "throughput:1:128:none", "--profile", "--out", str(tmp_path)])

    np.testing.assert_array_equal(batches[0]["segment_ids"], bench.segment_ids(1, 128, 3))
    (r,) = bench._records(tmp_path / "train_gpu.jsonl")
    cfg = presets.get("mamba2-tiny-hybrid")
    assert r["model"] == "mamba2-tiny-hybrid" and r["documents"] == 3 and r["kind"] == "throughput"
    assert np.isfinite(r["loss"]) and r["step_s"] > 0 and r["params"] == models.count_params(cfg)
    assert isinstance(r["custom_calls"], list)  # the step's fused kernels: none on CPU, named on a GPU
    n_soft = len(cfg.softmax_set)
    span = metrics.attention_length(bench.segment_ids(1, 128, 3))
    assert r["attention_length"] == round(span, 1) and span < 128
    flops = (6 * r["matmul_params"] + 6 * (cfg.n_layers - n_soft) * cfg.ssm_heads * 2 * cfg.d_state
             * cfg.resolved_head_dim + 6 * n_soft * cfg.n_heads * span * cfg.resolved_head_dim)
    assert r["model_tflop_per_step"] * 1e12 == pytest.approx(flops * 128, rel=1e-12)

    # --profile: one more step traced; a CPU trace has no GPU rows, so no kernel time, but the HLO's lines are read.
    assert r["profile_ms"] == {}
    profile = (tmp_path / "profile-mamba2-tiny-hybrid-1-128-none-1-auto.md").read_text()
    assert "GPU kernel time in the traced step: 0.0 ms per GPU" in profile and "3 documents per row" in profile

    bench.write_summary(tmp_path / "train_gpu.jsonl")
    assert "| mamba2-tiny-hybrid | 3 | throughput | 1 | 128 | none |" in (tmp_path / "train_gpu.md").read_text()
