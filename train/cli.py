"""The command line: `python -m train [--config FILE] [--model-preset NAME] [--FIELD VALUE ...]`.

    python -m train --config configs/train_tnl_1b.py --data /data/corpus.bin --mesh data=1,seq=8
    python -m train --steps 3000 --lr 1e-3 --model.strategy scan --model.softmax-layers 1 3 --no-resume
    python -m train --config configs/mamba2_tiny.py      # the same tiny run with Mamba-2 (--model-preset mamba2-tiny)

A config file is a Python file with `get_config() -> TrainConfig`; without --config the embedded default
(configs/tnl_tiny.py: the tiny TNL on the standard library's sources, 8 CPU devices) runs. --model-preset
replaces the file's model by a named one (models.presets). Every TrainConfig field is then a flag of its own,
`--model.X` for the model's fields (tyro builds them from the dataclasses: `--help` lists each with its type,
default and comment; `-` and `_` are both accepted in names; booleans are `--resume` / `--no-resume`; tuples
take several values), except the model's fields that training sets itself (--model.vocab-size, --model.dtype,
--model.param-dtype: refused with the flag to use instead). The result is checked by TrainConfig itself and
`validate` before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from models.presets import PRESETS
from train.config import SET_BY_TRAINING, TrainConfig, validate
from train.distributed import DistributedArgs

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tnl_tiny.py"


@dataclass(frozen=True)
class Command:
    """Train a LASP model (Flax NNX, optax, orbax)."""

    train: Annotated[TrainConfig, tyro.conf.arg(name="")]
    config: str = str(DEFAULT_CONFIG)  # Python file whose get_config() returns the TrainConfig the flags change
    model_preset: Literal[tuple(PRESETS)] | None = None  # replace the config file's model by this named one
    coordinator: str | None = None  # multi-host (all three, or none to auto-detect): host:port of process 0
    num_processes: int | None = None  # multi-host: the number of processes
    process_id: int | None = None  # multi-host: this process's index


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


def flags(cfg: TrainConfig) -> list[str]:
    """The flags that make `cfg` whatever the config file: every field, model fields as --model.X (to start the
    same run on other hosts, or in a test's subprocess), except the model's fields that training sets itself
    (SET_BY_TRAINING), which have no flags."""
    out: list[str] = []

    def add(prefix: str, obj) -> None:
        for f in dataclasses.fields(obj):
            if prefix == "model." and f.name in SET_BY_TRAINING:
                continue
            name, value = prefix + f.name, getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                add(f"{name}.", value)
            elif isinstance(value, bool):
                out.append(f"--{name}" if value else f"--{prefix}no-{f.name}")
            elif isinstance(value, tuple):
                out.extend([f"--{name}", *map(str, value)])
            else:
                out.extend([f"--{name}", str(value)])

    add("", cfg)
    return out


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, DistributedArgs]:
    """argv -> a validated config and the multi-host flags. ValueError for a bad config file, the old --set, or
    a value TrainConfig itself rejects; SystemExit (status 2, tyro's message on stderr) for a flag or value tyro
    rejects (a ModelConfig's own errors included: tyro catches those of nested dataclasses), and for --help
    (status 0). Either way `python -m train` exits 2 with the reason on stderr."""
    if argv is None:
        argv = sys.argv[1:]
    if "--set" in argv:  # the hand-written parser's syntax, before tyro: say what it is now
        i = argv.index("--set")
        name, _, value = (argv[i + 1] if i + 1 < len(argv) else "NAME=VALUE").partition("=")
        raise ValueError(f"--set is gone: every field is a flag of its own, e.g. --{name} {' '.join(value.split(','))} "
                         "(model fields --model.NAME VALUE; python -m train --help lists them)")
    for arg in argv:
        flag = arg.split("=", 1)[0]
        field = flag.removeprefix("--model.").replace("-", "_")
        if flag.startswith("--model.") and field in SET_BY_TRAINING:
            raise ValueError(f"{flag}: training sets the model's {field} itself, so this flag would be ignored; "
                             f"{SET_BY_TRAINING[field]}")
    # The config file and the preset make the defaults the other flags change, so they are read first.
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", default=str(DEFAULT_CONFIG))
    first.add_argument("--model-preset", "--model_preset", dest="model_preset", choices=list(PRESETS))
    known, _ = first.parse_known_args(argv)
    cfg = load_config_file(known.config)
    if known.model_preset:
        cfg = dataclasses.replace(cfg, model=PRESETS[known.model_preset])
    default = Command(train=cfg, config=known.config, model_preset=known.model_preset)
    cmd = tyro.cli(Command, default=default, args=argv, prog="python -m train")
    validate(cmd.train)
    return cmd.train, DistributedArgs(cmd.coordinator, cmd.num_processes, cmd.process_id)
