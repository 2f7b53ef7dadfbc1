"""`python -m train`: parse and validate the command line, set up the processes, train, report.

With no arguments it runs the embedded default, configs/tnl_tiny.py: the tiny TNL trained byte-level on the
Python standard library's sources on 8 forced CPU devices (data=2 x seq=4), ending with a generated sample.
Exit status: 0 done, 2 bad config or data (or the run directory is in use), 3 NaN/inf, 4 a checkpoint could
not be saved or none restores, 128 + N stopped by signal N (SIGTERM, SIGINT) after saving.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from train import cli

    try:
        cfg, dist = cli.parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Device settings must precede the first JAX computation, so they come before importing the loop.
    import jax

    if cfg.platform:
        jax.config.update("jax_platforms", cfg.platform)
    import signal

    from train import checkpoint, config, distributed, loop

    try:
        distributed.setup(cfg.cpu_devices, dist)
        config.check_platform(cfg.platform)
        result = loop.train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    if result.stopped_by:  # saved and stopped by a signal: the shell's convention for death by that signal
        return 128 + signal.Signals[result.stopped_by].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
