"""TNL-1B on GPUs with the LASP paper's optimiser: a run config for real data.

    python -m train --config configs/train_tnl_1b.py --data /data/corpus --tokenizer /data/tokenizer.json

The sequence is split over every GPU of every host (mesh seq=-1) and each GPU holds seq_len / n_gpus tokens:
64K tokens per GPU on 8 GPUs is seq_len 524288. Give the data (text, .jsonl or pre-tokenized .bin) and its
tokenizer; the model's vocabulary follows the tokenizer's (rounded up to a multiple of 128).
"""

from models import presets
from train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        # Per block keep the matmul outputs and the attention's output and piece states, recompute the rest: on one
        # H200 at 64K 0.766 s a step against remat "block"'s 0.779 (two calls, whose spread is of that order; it
        # skips the attention's forward in the remat, by construction), 65.6 against 62.0 GiB
        # (benchmarks/results/train_gpu_h200_s14.md).
        model=presets.get("tnl-1b").replace(remat="block_attention"),
        run_dir="runs/tnl_1b",
        steps=50_000,
        mesh="data=1,seq=-1",
        data=(),  # required: --data PATH [PATH ...]
        seq_len=65_536,
        batch_size=1,
        compute_dtype="bfloat16",  # fp32 master weights and AdamW
        # LASP paper: AdamW lr 5e-4, betas 0.9 / 0.999, weight decay 0.01, 2000 warmup, cosine over 50K
        lr=5e-4, b1=0.9, b2=0.999, weight_decay=0.01, warmup_steps=2000, decay_steps=50_000, clip_norm=1.0,
        ckpt_every=1000,
        ckpt_keep=3,
        log_every=10,
        eval_every=1000,
        eval_batches=8,
        sample_tokens=200,
        sample_prompt="The",
    )
