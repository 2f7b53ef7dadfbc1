"""The training run's configuration: one frozen dataclass, command-line overrides, and up-front validation.

A run is described by a `TrainConfig` (a config file returns one from `get_config()`), changed field by field
with `--set name=value` (model fields as `--set model.d_model=64`). Everything that can be checked before JAX
starts working is checked here, with a ValueError that names the field and what is wrong; checks that need
the devices (does the mesh fit?) live in `validate_against_devices`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MESH_AXES = ("data", "seq")  # the axes the models shard over: batch over `data`, sequence over `seq`


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; defaults are the LASP paper's optimiser and a small CPU-sized run."""

    # --- model ---------------------------------------------------------------------------------------
    model: str = "tnl-tiny"  # a name in configs.models.MODEL_CONFIGS
    # Overrides of models.ModelConfig fields, e.g. {"d_model": 64}; from the command line `--set model.X=V`.
    model_overrides: Mapping[str, typing.Any] = field(default_factory=dict)
    vocab_multiple: int = 128  # the model's vocabulary is the tokenizer's rounded up to this (shardable sizes)

    # --- run --------------------------------------------------------------------------------------------
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, config.json and the plot go here
    seed: int = 0  # parameter initialisation; the data order has its own seed below
    steps: int = 50_000  # optimiser steps to train for (a resumed run continues up to this)

    # --- devices ----------------------------------------------------------------------------------------
    platform: str = ""  # "" = JAX's default backend; "cpu" forces CPU even where a GPU is present
    # axis=size pairs over data and seq; one size may be -1 (fill the devices). A one-process run may use
    # fewer devices than it has (the first ones); a multi-process mesh must use them all.
    mesh: str = "data=2,seq=4"
    mesh_axis_type: str = "auto"  # "auto" (XLA propagates shardings) or "explicit" (sharding in types)
    cpu_devices: int = 0  # >0: force this many CPU devices (set before JAX initialises); 0: leave as is

    # --- data -------------------------------------------------------------------------------------------
    # Files, directories or globs of .txt / .jsonl (text field below) / .bin (pre-tokenized); "stdlib" means
    # the .py sources of the running interpreter's standard library (real text present on every machine).
    data: tuple[str, ...] = ("stdlib",)
    tokenizer: str = "byte"  # "byte" (UTF-8 bytes + a separator) or a Hugging Face tokenizers .json file
    eos_token: str = ""  # separator token for a HF tokenizer ("" = the first of a few common names it has)
    text_field: str = "text"  # the field of each .jsonl line that holds the document
    bin_dtype: str = "uint16"  # token dtype of .bin files: uint16 or uint32
    vocab_size: int = 0  # for .bin data without a tokenizer: the token id bound (0 = take the tokenizer's)
    max_data_bytes: int = 0  # >0: read at most this many bytes of text (whole documents; the first ones)
    seq_len: int = 256  # tokens per training sequence (the packed window is seq_len + 1 for the targets)
    batch_size: int = 8  # sequences per step, over all hosts and devices
    val_fraction: float = 0.01  # the tail of the token stream held out for validation
    data_seed: int = 0  # the shuffle order; each epoch is reshuffled from it
    data_threads: int = 2  # Grain read threads per host (prefetching the next batches)

    # --- optimiser (LASP paper: AdamW, lr 5e-4, betas 0.9/0.999, wd 0.01, 2000 warmup, cosine to 50K) ----
    lr: float = 5e-4
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01  # on matrices only; norms, biases and decay rates are not decayed
    warmup_steps: int = 2000
    decay_steps: int = 50_000  # the cosine's length (warmup included); the rate stays at its floor after
    min_lr_ratio: float = 0.1  # the cosine's floor as a fraction of lr
    clip_norm: float = 1.0  # global gradient norm clipping (0 = off)
    compute_dtype: str = "bfloat16"  # activations and matmuls; parameters stay float32 (master weights)

    # --- checkpoints ------------------------------------------------------------------------------------
    ckpt_every: int = 1000  # save every N steps (asynchronously) and at the end
    ckpt_keep: int = 3  # keep the K newest checkpoints
    resume: bool = True  # continue from the newest checkpoint in run_dir (False: refuse a run_dir that has one)

    # --- seeing it run ----------------------------------------------------------------------------------
    log_every: int = 10  # metrics.jsonl line and progress-bar refresh every N steps
    eval_every: int = 500  # validation loss and perplexity every N steps (0 = only at the end)
    eval_batches: int = 4
    progress: bool = True  # a tqdm bar on process 0
    peak_tflops: float = 0.0  # per-device peak for MFU (0 = look the device up; unknown devices show no MFU)
    sample_tokens: int = 200  # at the end, generate this many tokens from the recurrent state (0 = none)
    sample_prompt: str = "def "
    sample_temperature: float = 0.8


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, raw: str, tp):
    """Parses the command-line string `raw` as the annotated type `tp` of field `name`."""
    origin = typing.get_origin(tp)
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean (true/false), got {raw!r}")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    if origin is typing.Literal:
        options = typing.get_args(tp)
        if raw not in options:
            raise ValueError(f"{name}: expected one of {options}, got {raw!r}")
        return raw
    if origin is tuple:
        args = typing.get_args(tp)
        elem = args[0] if args else str
        return tuple(_coerce(name, part.strip(), elem) for part in raw.split(",") if part.strip())
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.strip().lower() == "none" and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(name, raw, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    raise ValueError(f"{name}: cannot be set from the command line (type {tp})")


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_overrides(cfg: TrainConfig, overrides: list[str], model_field_types: Mapping[str, typing.Any] | None
                    = None) -> TrainConfig:
    """Returns cfg with each "name=value" applied; "model.X=V" goes to model_overrides.

    model_field_types: the models.ModelConfig field types, to parse model.X values (and reject unknown X).
    """
    hints = typing.get_type_hints(TrainConfig)
    changes: dict[str, typing.Any] = {}
    model_changes = dict(cfg.model_overrides)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip()
        if name.startswith("model."):
            key = name[len("model."):]
            if model_field_types is None:
                raise ValueError(f"--set {name}: model fields are unknown here")
            if key not in model_field_types:
                raise ValueError(f"unknown model field {key!r}{_did_you_mean(key, model_field_types)}")
            model_changes[key] = _coerce(name, raw, model_field_types[key])
            continue
        if name not in hints or name == "model_overrides":
            raise ValueError(f"unknown config field {name!r}{_did_you_mean(name, field_names())}")
        changes[name] = _coerce(name, raw, hints[name])
    return dataclasses.replace(cfg, **changes, model_overrides=model_changes)


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


def validate(cfg: TrainConfig) -> None:
    """Checks that need no devices; raises ValueError naming the field."""
    positive = ("steps", "seq_len", "batch_size", "ckpt_every", "ckpt_keep", "log_every", "eval_batches",
                "vocab_multiple", "data_threads")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "max_data_bytes", "cpu_devices", "vocab_size", "sample_tokens"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    for name in ("b1", "b2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.decay_steps < cfg.warmup_steps:
        raise ValueError(f"decay_steps ({cfg.decay_steps}) must be >= warmup_steps ({cfg.warmup_steps})")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.weight_decay < 0 or cfg.clip_norm < 0:
        raise ValueError("weight_decay and clip_norm must be >= 0")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.bin_dtype not in ("uint16", "uint32"):
        raise ValueError(f"bin_dtype must be uint16 or uint32, got {cfg.bin_dtype!r}")
    if cfg.compute_dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {cfg.compute_dtype!r}")
    if cfg.mesh_axis_type not in ("auto", "explicit"):
        raise ValueError(f"mesh_axis_type must be auto or explicit, got {cfg.mesh_axis_type!r}")
    if cfg.platform not in ("", "cpu", "gpu", "cuda", "tpu"):
        raise ValueError(f"platform must be '', cpu, gpu, cuda or tpu, got {cfg.platform!r}")
    if not cfg.data:
        raise ValueError("data: no data given; pass files, directories or globs, or 'stdlib'")
    if cfg.tokenizer != "byte" and not Path(cfg.tokenizer).is_file():
        raise ValueError(f"tokenizer: {cfg.tokenizer!r} is neither 'byte' nor an existing tokenizer .json file")
    if cfg.sample_temperature < 0:
        raise ValueError(f"sample_temperature must be >= 0, got {cfg.sample_temperature}")
    parse_mesh(cfg.mesh)


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
