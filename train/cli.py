"""The command line: `python -m train [--config FILE] [--mesh data=2,seq=4] [--set name=value ...]`.

A config file is a Python file with `get_config() -> TrainConfig`; without --config the embedded default
(configs/tnl_tiny.py: the tiny TNL on the standard library's sources, 8 CPU devices) runs. Flags are applied
in order config file -> --mesh/--run-dir/--steps -> --set, then everything is validated before JAX starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import typing
from pathlib import Path

from train.config import TrainConfig, apply_overrides, validate
from train.distributed import DistributedArgs

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tnl_tiny.py"


def load_config_file(path: str | Path) -> TrainConfig:
    """Runs the file's get_config(); raises ValueError if it is missing or returns something else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get = getattr(module, "get_config", None)
    if get is None:
        raise ValueError(f"--config {str(path)!r} defines no get_config()")
    cfg = get()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"--config {str(path)!r}: get_config() returned {type(cfg).__name__}, not a TrainConfig")
    return cfg


def model_field_types() -> dict[str, typing.Any]:
    """Field name -> type of models.ModelConfig, for `--set model.X=V`."""
    from models.config import ModelConfig

    return typing.get_type_hints(ModelConfig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="Train a LASP model (Flax NNX, optax, orbax).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Python file with get_config() (default: %(default)s)")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,seq=4 (same as --set mesh=...)")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (same as --set run_dir=...)")
    p.add_argument("--steps", help="optimiser steps (same as --set steps=...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a config field (repeatable); model fields as model.NAME=VALUE")
    g = p.add_argument_group("multi-host (all three, or none to auto-detect)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return p


def parse(argv=None) -> tuple[TrainConfig, DistributedArgs]:
    """argv -> a validated config and the multi-host flags. Raises ValueError on a bad config."""
    args = parser().parse_args(argv)
    cfg = load_config_file(args.config)
    overrides = [f"{name}={value}" for name, value in
                 (("mesh", args.mesh), ("run_dir", args.run_dir), ("steps", args.steps)) if value is not None]
    overrides += args.overrides
    needs_model = any(o.startswith("model.") for o in overrides)
    cfg = apply_overrides(cfg, overrides, model_field_types() if needs_model else None)
    validate(cfg)
    return cfg, DistributedArgs(args.coordinator, args.num_processes, args.process_id)
