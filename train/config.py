"""The training run's configuration: one frozen dataclass that nests the model's, checked when it is made.

A run is described by a `TrainConfig` (a config file returns one from `get_config()`); train.cli changes it
field by field from the command line (`--lr 3e-4`, `--model.d-model 64`; tyro builds the parser from the
fields, their types and the comments beside them). Every field is checked in `__post_init__`, so no invalid
TrainConfig exists: Literal choices, finite float32 values and tuples by models.config.check_fields (shared
with ModelConfig), ranges here. `validate` adds what a run needs beyond valid fields (data, a tokenizer file);
checks that need the devices (does the mesh fit?) are `resolve_mesh` and `validate_shapes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models import presets
from models.config import ModelConfig, check_fields

MESH_AXES = ("data", "seq")  # the axes the models shard over: batch over `data`, sequence over `seq`

# The model's fields that training sets itself (train.step.model_config), with the flags that set them: a
# --model.X flag for one of them would be ignored, so the command line refuses it (train.cli).
SET_BY_TRAINING = {
    "vocab_size": "the model's vocabulary is the data's (--vocab-size; 0 = the tokenizer's) rounded up to "
                  "--vocab-multiple",
    "dtype": "the model computes in --compute-dtype",
    "param_dtype": "parameters are always float32 master weights (--compute-dtype sets what the model "
                   "computes in)",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; defaults are the LASP paper's optimiser and a small CPU-sized run."""

    # --- model ---------------------------------------------------------------------------------------

    # The architecture (presets: models.presets). Training sets three of its fields (SET_BY_TRAINING, so their
    # --model.X flags are refused): vocab_size from the data (vocab_size and vocab_multiple below), dtype from
    # compute_dtype, param_dtype float32.
    model: ModelConfig = presets.PRESETS["tnl-tiny"]
    vocab_multiple: int = 128  # the model's vocabulary is the data's rounded up to this (shardable sizes)

    # --- run --------------------------------------------------------------------------------------------

    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, config.json and the plot go here
    seed: int = 0  # parameter initialisation; the data order has its own seed below
    steps: int = 50_000  # optimiser steps to train for (a resumed run continues up to this)

    # --- devices ----------------------------------------------------------------------------------------

    platform: Literal["", "cpu", "gpu", "cuda", "tpu"] = ""  # "": JAX's default backend; "cpu" forces CPU
    # axis=size pairs over data and seq; one size may be -1 (fill the devices). A one-process run may use
    # fewer devices than it has (the first ones); a multi-process mesh must use them all.
    mesh: str = "data=2,seq=4"
    mesh_axis_type: Literal["auto", "explicit"] = "auto"  # auto: XLA propagates shardings; explicit: in types
    cpu_devices: int = 0  # >0: force this many CPU devices (set before JAX initialises); 0: leave as is

    # --- data -------------------------------------------------------------------------------------------

    # Files, directories or globs of .txt / .jsonl (text field below) / .bin (pre-tokenized); "stdlib" means
    # the .py sources of the running interpreter's standard library (real text present on every machine).
    data: tuple[str, ...] = ("stdlib",)
    tokenizer: str = "byte"  # "byte" (UTF-8 bytes + a separator) or a Hugging Face tokenizers .json file
    eos_token: str = ""  # separator token for a HF tokenizer ("" = the first of a few common names it has)
    text_field: str = "text"  # the field of each .jsonl line that holds the document
    bin_dtype: Literal["uint16", "uint32"] = "uint16"  # token dtype of .bin files
    vocab_size: int = 0  # the token id bound (0 = the tokenizer's); needed for .bin data without a tokenizer
    max_data_bytes: int = 0  # >0: read at most this many bytes of text (whole documents; the first ones)
    seq_len: int = 256  # tokens per training sequence (the packed window is seq_len + 1 for the targets)
    batch_size: int = 8  # sequences per step, over all hosts and devices
    val_fraction: float = 0.01  # the tail of the token stream held out for validation
    data_seed: int = 0  # the shuffle order; each epoch is reshuffled from it
    data_threads: int = 2  # Grain read threads per host (prefetching the next batches)
    # reset: packed documents stay apart (segment ids from the separators: a layer's state restarts and softmax
    # attention is masked at each document start; linear attention then runs lasp_jax's per-token path, about
    # 2.0x the constant-decay attention time on an H200); continuous: a row is one sequence across its documents
    documents: Literal["reset", "continuous"] = "reset"

    # --- optimiser (LASP paper: AdamW, lr 5e-4, betas 0.9/0.999, wd 0.01, 2000 warmup, cosine to 50K) ----

    lr: float = 5e-4  # peak learning rate
    b1: float = 0.9  # AdamW's first-moment decay
    b2: float = 0.999  # AdamW's second-moment decay
    weight_decay: float = 0.01  # on matrices only; norms, biases and decay rates are not decayed
    warmup_steps: int = 2000  # linear warmup from 0 to lr
    decay_steps: int = 50_000  # the cosine's length (warmup included); the rate stays at its floor after
    min_lr_ratio: float = 0.1  # the cosine's floor as a fraction of lr
    clip_norm: float = 1.0  # global gradient norm clipping (0 = off)
    # Activations and matmuls; parameters stay float32 (master weights). auto: bfloat16 on GPU and TPU,
    # float32 on CPU (XLA:CPU cannot run the model's bfloat16 dots).
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    # --- checkpoints ------------------------------------------------------------------------------------

    ckpt_every: int = 1000  # save every N steps (asynchronously) and at the end
    ckpt_keep: int = 3  # keep the K newest checkpoints
    resume: bool = True  # continue from the newest checkpoint in run_dir (False: refuse a run_dir that has one)

    # --- seeing it run ----------------------------------------------------------------------------------

    log_every: int = 10  # metrics.jsonl line and progress-bar refresh every N steps
    eval_every: int = 500  # validation loss and perplexity every N steps (0 = only at the end)
    eval_batches: int = 4  # validation batches per evaluation
    progress: bool = True  # a tqdm bar on process 0
    peak_tflops: float = 0.0  # per-device peak for MFU (0 = look the device up; unknown devices show no MFU)
    sample_tokens: int = 200  # at the end, generate this many tokens from the recurrent state (0 = none)
    sample_prompt: str = "def "  # the sample's prompt ("" = start from the separator token)
    sample_temperature: float = 0.8  # 0 = greedy

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        check_fields(self)
        if not isinstance(self.model, ModelConfig):
            bad(f"model must be a models.ModelConfig (e.g. models.presets.get('tnl-1b')), got {self.model!r}")
        for name in ("steps", "seq_len", "batch_size", "ckpt_every", "ckpt_keep", "log_every", "eval_batches",
                     "vocab_multiple", "data_threads"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "max_data_bytes", "cpu_devices", "vocab_size", "sample_tokens",
                     "weight_decay", "clip_norm", "peak_tflops", "sample_temperature"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            bad(f"lr must be positive, got {self.lr}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.decay_steps < self.warmup_steps:
            bad(f"decay_steps ({self.decay_steps}) must be >= warmup_steps ({self.warmup_steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            bad(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:
            bad(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.platform == "cpu" and self.compute_dtype == "bfloat16":
            bad(_CPU_BF16)
        parse_mesh(self.mesh)


_CPU_BF16 = ("compute_dtype=bfloat16 does not run on XLA:CPU (its step fails with 'Unsupported element type for "
             "DotThunk::Execute: BF16 x BF16 = F32'); use auto or float32 there")


def validate(cfg: TrainConfig) -> None:
    """What a run needs beyond valid fields (which TrainConfig checks itself); ValueError naming the field."""
    if not cfg.data:
        raise ValueError("data: no data given; pass files, directories or globs, or 'stdlib'")
    if cfg.tokenizer != "byte" and not Path(cfg.tokenizer).is_file():
        raise ValueError(f"tokenizer: {cfg.tokenizer!r} is neither 'byte' nor an existing tokenizer .json file")


def resolve_compute_dtype(compute_dtype: str, backend: str) -> str:
    """The dtype the model computes in on `backend` (jax.default_backend()): auto is bfloat16 on accelerators,
    float32 on CPU; ValueError for bfloat16 on CPU."""
    if compute_dtype == "auto":
        return "float32" if backend == "cpu" else "bfloat16"
    if compute_dtype == "bfloat16" and backend == "cpu":
        raise ValueError(_CPU_BF16)
    return compute_dtype


def check_platform(platform: str) -> None:
    """Starts JAX's backends (call after train.distributed.setup); ValueError naming the platform where JAX
    cannot start it here, e.g. platform=gpu on a machine without a GPU or without jax[cuda]."""
    import jax

    try:
        jax.devices()
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"platform={platform!r}: JAX cannot start that backend on this machine ({reason}); "
                         "leave platform empty for JAX's default, or use --platform cpu") from None


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,seq=4" -> {"data": 2, "seq": 4}; one size may be -1 (fill the devices). Axis order is kept."""
    axes: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"mesh: expected axis=size pairs like 'data=2,seq=4', got {spec!r}")
        name, size = (s.strip() for s in part.split("=", 1))
        if name not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {name!r} in {spec!r}; the axes are {', '.join(MESH_AXES)}")
        if name in axes:
            raise ValueError(f"mesh: axis {name!r} given twice in {spec!r}")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh: size of {name!r} must be an integer, got {size!r}") from None
        if axes[name] == 0 or axes[name] < -1:
            raise ValueError(f"mesh: size of {name!r} must be positive (or -1 to fill), got {size}")
    if not axes:
        raise ValueError("mesh: empty; give e.g. 'data=2,seq=4'")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {spec!r}")
    for name in MESH_AXES:
        axes.setdefault(name, 1)
    return axes


def resolve_mesh(spec: str, n_devices: int, n_processes: int = 1) -> dict[str, int]:
    """parse_mesh, with -1 filled in, checked against the number of devices (all of them across processes)."""
    axes = parse_mesh(spec)
    known = 1
    for size in axes.values():
        if size != -1:
            known *= size
    if -1 in axes.values():
        if n_devices % known:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices are not divisible by the fixed axes ({known})")
        axes = {k: (n_devices // known if v == -1 else v) for k, v in axes.items()}
    elif known > n_devices:
        raise ValueError(f"mesh {spec!r} needs {known} devices but {n_devices} are available")
    elif known != n_devices and n_processes > 1:
        raise ValueError(f"mesh {spec!r} uses {known} of the {n_devices} devices of {n_processes} processes; "
                         "a multi-process mesh must use every device")
    return axes


def validate_shapes(cfg: TrainConfig, mesh_axes: Mapping[str, int], n_processes: int = 1) -> None:
    """Checks that need the resolved mesh: the seq axis divides seq_len, the data axis the batch."""
    seq, data = mesh_axes["seq"], mesh_axes["data"]
    if cfg.seq_len % seq:
        raise ValueError(f"seq_len {cfg.seq_len} is not divisible by the seq axis size {seq} "
                         f"(each device holds seq_len / seq tokens)")
    if cfg.batch_size % data:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the data axis size {data}")
    if cfg.batch_size % n_processes:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_processes} processes")
