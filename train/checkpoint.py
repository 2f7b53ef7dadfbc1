"""Checkpoints through an orbax CheckpointManager: model and optimizer state, the data iterator, run metadata.

Each checkpoint RUN_DIR/checkpoints/<step>/ holds
    state/  the nnx state of (model, optimizer): float32 parameters, AdamW moments, step counters (sharded,
            each host writes its own shards)
    data/   the Grain iterator's position (one file per host)
    meta/   JSON: step, last training loss, the config
Saves are asynchronous (training continues while the files are written) and atomic: orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the newest one. `save` refuses non-finite losses, so a good checkpoint is never followed by a NaN one.
"""

from __future__ import annotations

import math
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every `every` steps (plus forced saves), keeps the `keep` newest."""

    def __init__(self, directory: Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        # The interval is applied here rather than by orbax, which would also save the first step it sees.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously) if step is due or force; returns whether a save started.

        Raises ValueError if meta["loss"] is not finite: the caller stops the run instead.
        """
        loss = meta.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise ValueError(f"refusing to checkpoint step {step}: loss is {loss}")
        if not (force or step % self.every == 0):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave(meta))
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int, abstract_state, data_iter):
        """(state, meta) of checkpoint `step`; data_iter is moved to the saved position in place.

        abstract_state: the state's tree of jax.ShapeDtypeStruct with shardings (where each array goes).
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iter),
                                  meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(state):
    """The ShapeDtypeStruct tree (shapes, dtypes, shardings) of a state tree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
