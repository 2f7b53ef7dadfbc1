"""`python -m train.plot RUN_DIR`: writes RUN_DIR/curves.png from RUN_DIR/metrics.jsonl.

Left: training loss against step, with validation loss where it was measured. Right: throughput (tokens/s)
and, where known, MFU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.metrics import read_metrics


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Reads run_dir/metrics.jsonl, writes a PNG (run_dir/curves.png unless out is given) and returns its path."""
    import matplotlib  # imported here, not at start-up: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics in {run_dir}: {path} does not exist")
    records = read_metrics(path)
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    val = [r for r in records if r.get("kind") == "val"]
    if not train and not val:
        raise SystemExit(f"{path} holds no training or validation records")

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    # loss_avg: the mean over the steps since the previous record (smoother than one step's loss)
    ax_loss.plot([r["step"] for r in train], [r.get("loss_avg", r["loss"]) for r in train], label="train", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    speed = [r for r in train if "tokens_per_s" in r]
    ax_speed.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], color="tab:green", lw=1)
    ax_speed.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_speed.grid(alpha=0.3)
    mfu = [r for r in speed if "mfu" in r]
    if mfu:
        ax_mfu = ax_speed.twinx()
        ax_mfu.plot([r["step"] for r in mfu], [100 * r["mfu"] for r in mfu], color="tab:red", lw=1)
        ax_mfu.set_ylabel("MFU (%)", color="tab:red")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description="Plot a run's loss curves to PNG.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    sys.exit(main())
