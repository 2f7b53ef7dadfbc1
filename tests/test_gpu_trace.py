"""benchmarks/gpu_trace.py: a trace's GPU kernels summed by kind and by the source line that launched them."""

import gzip
import inspect
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_trace


def _inner(x):
    return jnp.sin(x) * 3.0  # the line the sine's fusion must be attributed to


def _outer(x):
    return jnp.cos(_inner(x))


def _write_trace(path, events):
    path.mkdir(parents=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": events}, fh)


def test_kernel_times_sum_the_gpu_rows_only_per_gpu(tmp_path):
    meta = lambda pid, name: {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}  # noqa: E731
    kernel = lambda pid, name, op, us: {"ph": "X", "pid": pid, "name": name, "dur": us, "args": {"hlo_op": op}}  # noqa: E731
    _write_trace(tmp_path / "plugins" / "profile" / "run", [
        meta(1, "/host:CPU"), meta(2, "/device:GPU:0"), meta(3, "/device:GPU:1"),
        kernel(2, "loop_sine_fusion", "fusion.1", 1500.0), kernel(2, "loop_sine_fusion", "fusion.1", 500.0),
        kernel(3, "loop_sine_fusion", "fusion.1", 1000.0),
        kernel(2, "nvjet_hsh_128x256", "custom-call.3", 250.0), kernel(1, "host work", "", 9e6)])
    assert gpu_trace.kernel_times(tmp_path) == {("loop_sine_fusion", "fusion.1"): 1.5,
                                                ("nvjet_hsh_128x256", "custom-call.3"): 0.125}


def test_a_missing_trace_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="perfetto_trace.json.gz"):
        gpu_trace.kernel_times(tmp_path)


@pytest.mark.parametrize(("name", "kind"), [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", "matmul"), ("sm90_xmma_gemm_bf16bf16", "matmul"),
    ("loop_multiply_fusion_12", "xla fusion"), ("input_reduce_fusion", "xla fusion"),
    ("ncclDevKernel_SendRecv", "collective"), ("_mosaic_token_walk", "custom"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "cudnn attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", "cudnn attention")])
def test_kinds(name, kind):
    assert gpu_trace.kind(name) == kind


def test_instructions_are_attributed_to_the_innermost_line_of_ours_and_their_pass():
    x = jnp.ones(8)
    hlo = jax.jit(jax.grad(lambda x: _outer(x).sum())).lower(x).compile().as_text()
    sources = gpu_trace.hlo_sources(hlo)
    line = inspect.getsourcelines(_inner)[1] + 1
    # The file is this test's (not under models/ or lasp_jax/): the innermost frame, _inner's line; the cosine's
    # derivative (a sine, made by jvp) in the forward at _outer's line.
    sine = [name for name in sources if "sin" in name and sources[name] == (f"{__file__}:{line}", "forward")]
    assert sine, hlo
    assert (f"{__file__}:{line + 4}", "forward") in sources.values()
    assert any(p == "backward" for _, p in sources.values())  # the gradient's ops
    times = {("loop_sine_fusion", sine[0]): 3.0, ("nvjet_x", "nowhere"): 1.0}
    summary = gpu_trace.summarize(times, hlo)
    assert summary["total_ms"] == 4.0 and summary["kinds"] == {"xla fusion": 3.0, "matmul": 1.0}
    assert summary["lines"][0] == (f"{__file__}:{line}", "forward", "xla fusion", 3.0)
    assert "| xla fusion | 3.0 | 75.0% |" in gpu_trace.render(summary, "t")
