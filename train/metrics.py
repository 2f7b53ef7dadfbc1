"""Run metrics: one JSON object per line in RUN_DIR/metrics.jsonl, throughput, model FLOPs and MFU.

Model FLOPs per token (the numerator of MFU, as in PaLM's appendix B, adapted to linear attention):
    6 * N_matmul                       every parameter in a matmul (embedding lookup excluded, LM head included),
                                       2 FLOPs per multiply-add, forward + 2x for the backward
  + 6 * L_lin * H * 2 * Dk * Dv      per linear layer the recurrent state's two products per token (q.S and
                                       k^T v), forward + backward: the minimum linear attention needs. The
                                       chunked kernels also do intra-chunk O(C) work per token; that is not
                                       counted, so MFU here is a lower bound on hardware utilisation.
  + 6 * L_soft * H * T * D             per softmax layer (hybrids) QK^T and PV over the causal half of T; with
                                       packed documents T is the rows' attention length, sum of len_d^2 / T
                                       (attention_length), as the layers attend within each document: the
                                       training loop counts each batch's (its process's rows), as
                                       bench_train_gpu counts its rows'.
Peak FLOP/s per device come from `peak_tflops` or a table of known accelerators' dense bf16 peaks.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from models.config import ModelConfig

# Dense bf16 peak TFLOP/s of one device (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Per-device dense bf16 peak for MFU; None where unknown (CPUs)."""
    if override > 0:
        return override
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops
    return None


def flops_per_token(model: ModelConfig, n_matmul_params: int, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward) of `model` at sequence length `seq_len` (with packed
    documents their attention_length), whose matmuls hold `n_matmul_params` parameters (train.step.build_state
    counts them); see the module docstring."""
    n_softmax = len(model.softmax_set)
    n_linear = model.n_layers - n_softmax
    heads, dim_k, dim_v = model.linear_state_shape  # Mamba-2: SSM heads x d_state x head dim
    return (6.0 * n_matmul_params + 6.0 * n_linear * heads * 2 * dim_k * dim_v
            + 6.0 * n_softmax * model.n_heads * seq_len * model.resolved_head_dim)


def attention_length(segment_ids) -> float:
    """[B, T] document ids (a document starts wherever the id changes) -> the T that flops_per_token's softmax
    term takes for causal attention within documents: the mean over rows of sum_d len_d^2 / T (T without
    documents)."""
    ids = np.asarray(segment_ids)
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"segment_ids must be a non-empty [B, T] array, got shape {ids.shape}")
    total = 0.0
    for row in ids:
        lengths = np.diff(np.flatnonzero(np.diff(row, prepend=row[0] - 1, append=row[-1] - 1)))
        total += float(np.sum(lengths.astype(np.float64) ** 2)) / row.size
    return total / len(ids)


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the model FLOP/s achieved over `n_devices` x `peak` TFLOP/s (None: peak unknown)."""
    return tokens_per_s * flops_per_token / (n_devices * peak * 1e12) if peak else None


def device_memory_gib(device) -> float | None:
    """Peak bytes in use on `device` in GiB where the backend reports it (GPUs), else None."""
    try:
        stats = device.memory_stats()
    except Exception:  # CPU backends raise or return None
        return None
    if not stats:
        return None
    used = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return None if used is None else used / 2**30


class Throughput:
    """Tokens/s and MFU over the steps since the last `measure` call (wall clock, steps already synced); each
    step's model FLOPs at flops_per_token unless the step gives its own (a batch's documents)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, n_devices: int, peak: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.n_devices, self.peak = n_devices, peak
        self.reset()

    def step(self, flops_per_token: float | None = None) -> None:
        self._steps += 1
        self._flops += self.tokens_per_step * (self.flops_per_token if flops_per_token is None else flops_per_token)

    def reset(self) -> None:
        """Restarts the clock without reporting (after compilation, evaluation or checkpointing)."""
        self._t, self._steps, self._flops = time.perf_counter(), 0, 0.0

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        dt, steps, flops = now - self._t, self._steps, self._flops
        self._t, self._steps, self._flops = now, 0, 0.0
        if steps == 0 or dt <= 0:
            return {}
        tps = steps * self.tokens_per_step / dt
        out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.n_devices, "step_time_s": dt / steps}
        if self.peak:
            out["mfu"] = mfu(tps, flops / (steps * self.tokens_per_step), self.n_devices, self.peak)
        return out


class MetricsLog:
    """Appends {"step": s, ...} lines to metrics.jsonl; only process 0 writes. A resumed run keeps appending
    and `read_metrics` keeps the last record of each (step, kind), so replayed steps do not duplicate."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb+") as fh:  # a killed run may have left half a line: end it
                    fh.seek(-1, 2)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")

    def write(self, step: int, kind: str, **values) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": time.time()}
        record.update({k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                       for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, the last one for each (step, kind), in step order.

    Lines that are not a JSON record with a step (half-written by a run killed mid-write, or being written
    now) are skipped with a warning naming them.
    """
    latest: dict[tuple[int, str], dict] = {}
    damaged = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                latest[(int(record["step"]), record.get("kind", "train"))] = record
            except (ValueError, KeyError, TypeError):
                damaged.append(n)
    if damaged:
        warnings.warn(f"{path}: skipped {len(damaged)} damaged line(s) (line {', '.join(map(str, damaged[:5]))}"
                      f"{', ...' if len(damaged) > 5 else ''}); a run killed mid-write leaves half a line",
                      stacklevel=2)
    return sorted(latest.values(), key=lambda r: (r["step"], r.get("kind", "")))


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))
