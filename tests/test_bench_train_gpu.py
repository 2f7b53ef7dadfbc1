"""The training benchmark's watchdog (benchmarks/bench_train_gpu.py): a multi-GPU attempt that runs out of
memory on one GPU can leave the others waiting in a collective for ever; it must be killed and counted as out
of memory, and a child that recovers from an out-of-memory warning must not be."""

import sys
import time

import pytest

from benchmarks import bench_train_gpu as bench

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
    record = Hanging([], tmp_path, time.monotonic() + 50, ["0"], {}).run("attempt", 2, 655360, "full")
    assert time.monotonic() - t0 < 30
    assert record["kind"] == "longest" and record["fits"] is False and record["oom"] is True
    assert record["gpus"] == 2 and record["tokens_per_gpu"] == 655360 and record["remat"] == "full"
