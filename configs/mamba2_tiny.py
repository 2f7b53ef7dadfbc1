"""The tiny Mamba-2 trained byte-level on the Python standard library's own sources, beside configs/tnl_tiny.py.

    python -m train --config configs/mamba2_tiny.py

The same run as the tiny TNL's (8 forced CPU devices as data=2 x seq=4, packed documents kept apart) with the
mamba2-tiny preset: the SSD core runs as lasp_jax's per-token linear attention (its states cross the seq ranks)
and the causal convolution passes its halo between neighbouring ranks. tests/train/test_train_mamba2.py trains
this model for a few steps from `python -m train` and checks that its validation loss falls and resume is exact.
"""

import time

from models import presets
from train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=presets.get("mamba2-tiny"),
        run_dir=f"runs/mamba2_tiny-{time.strftime('%Y%m%d-%H%M%S')}",  # a fresh run each time (--run-dir to resume)
        steps=1500,
        platform="cpu",
        cpu_devices=8,
        mesh="data=2,seq=4",
        data=("stdlib",),
        tokenizer="byte",
        max_data_bytes=4_000_000,
        seq_len=128,
        batch_size=16,
        val_fraction=0.02,
        documents="reset",
        lr=3e-3,
        warmup_steps=50,
        decay_steps=1500,
        ckpt_every=500,
        log_every=20,
        eval_every=500,
        eval_batches=4,
        sample_tokens=160,
        sample_prompt="def ",
    )
