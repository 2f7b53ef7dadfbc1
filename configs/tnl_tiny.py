"""The main job: the tiny TNL trained byte-level on the Python standard library's own sources.

Runs anywhere in a few minutes: 8 forced CPU devices as a data=2 x seq=4 mesh, so every step exercises LASP's
sequence parallelism (each device holds a quarter of every sequence) and data parallelism at once.
`python -m train` runs it (about 2-3.5 minutes on 2 shared CPU cores); `--steps 3000` trains longer.
"""

import time

from models import presets
from train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=presets.get("tnl-tiny"),
        run_dir=f"runs/tnl_tiny-{time.strftime('%Y%m%d-%H%M%S')}",  # a fresh run each time (--run-dir to resume)
        steps=1500,
        platform="cpu",
        cpu_devices=8,
        mesh="data=2,seq=4",
        data=("stdlib",),
        tokenizer="byte",
        max_data_bytes=4_000_000,  # the first ~4 MB of stdlib sources: ~4M byte tokens, 0.8 epoch
        seq_len=128,
        batch_size=16,
        val_fraction=0.02,
        lr=3e-3,  # a small model on a short run: higher than the paper's 5e-4, warmed up quickly
        warmup_steps=50,
        decay_steps=1500,
        ckpt_every=500,
        log_every=20,
        eval_every=500,
        eval_batches=4,
        sample_tokens=160,
        sample_prompt="def ",
    )
