"""The training script: `python -m train` (see train/__main__.py and README's main job).

config (TrainConfig, overrides, validation) -> data (Grain pipeline) -> step (sharded nnx state, jitted step)
-> loop (checkpoints, metrics, progress, sample); plot draws a run's curves.
"""
