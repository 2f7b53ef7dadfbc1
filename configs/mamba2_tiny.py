"""The tiny Mamba-2 trained byte-level on the Python standard library's own sources: configs/tnl_tiny.py's run with
the mamba2-tiny preset.

    python -m train --config configs/mamba2_tiny.py

The same run as the tiny TNL's (8 forced CPU devices as data=2 x seq=4, packed documents kept apart): the SSD core
runs as lasp_jax's per-token linear attention (its states cross the seq ranks) and the causal convolution passes
its halo between neighbouring ranks. tests/train/test_train_mamba2.py trains this model for a few steps from
`python -m train` and checks that its validation loss falls and resume is exact.
"""

import dataclasses
import time
from pathlib import Path

from models import presets
from train.cli import load_config_file
from train.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(
        load_config_file(Path(__file__).with_name("tnl_tiny.py")),
        model=presets.get("mamba2-tiny"),
        run_dir=f"runs/mamba2_tiny-{time.strftime('%Y%m%d-%H%M%S')}",  # a fresh run each time (--run-dir to resume)
    )
