"""Checkpoints through an orbax CheckpointManager, verified on restore, and the lock that gives a run directory
one writer.

Each checkpoint RUN_DIR/checkpoints/<step>/ holds
    state/  the nnx state of (model, optimizer): float32 parameters, AdamW moments, step counters (sharded,
            each host writes its own shards)
    data/   the Grain iterator's position (one file per host)
    meta/   JSON: step, last training loss, the config, and `digest`: one checksum per state array
Saves are asynchronous (training continues while the files are written) and atomic: orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the newest one. `save` refuses a non-finite loss or non-finite parameters, so no checkpoint holds NaN or inf.
A failed save raises CheckpointError (at that save, or at the next save / `wait` when it failed in the
background) instead of blocking: orbax's asynchronous directory creation is turned off because a failure
there left the main thread waiting for a signal that never came (still blocked after 60 s when tried; orbax's
signal waits time out after 300 s).

Restore tries the newest checkpoint first and falls back to older ones when one cannot be read (a truncated or
missing file, missing metadata) or when its arrays no longer match their checksums (silent corruption); the
ones skipped are renamed <step>.unrestorable (<step>.unrestorable.N if that step was set aside before), kept
for inspection. On several processes a step counts as restored only if it restored and verified on all of them;
otherwise every process skips it.

Checksum of an array x (any sharding; the same value on every host and for any mesh): its elements' bits u_i
as uint32 (floats bitcast, 16-bit floats widened), summed as sum_i u_i * (2 i + 1) mod 2^32. Every weight is
odd, so any single flipped bit changes the sum (2^k * odd is never 0 mod 2^32); a swap of two elements
changes it unless their bits are equal.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import os
import socket
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


# The name of the barrier that ends orbax's Checkpointer.restore for the AsyncCheckpointer the manager uses
# (orbax 0.12: unique_barrier_key("Checkpointer:restore", prefix="")). It must match orbax's: were it renamed (or
# the checkpointer made synchronous, whose key has no prefix), the processes that read the step and the one that
# failed would pair the wrong collectives (same-sized votes pair silently): pinned to orbax-checkpoint==0.12.4.
_ORBAX_RESTORE_BARRIER = "_Checkpointer:restore"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, or no checkpoint of a run could be restored."""


class NonFiniteState(ValueError):
    """The loss or the parameters to be saved hold NaN or inf; nothing was saved."""


class RunDirBusy(ValueError):
    """Another live process holds the run directory's lock."""


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 scalar: sum_i bits(x_i) * (2 i + 1) mod 2^32 over the flattened array (module docstring)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    bits = x.astype(jnp.uint32)
    # The flat index, built from per-dimension iotas sharded like x: a ravel would need x gathered (on an
    # Explicit mesh, an explicit out_sharding).
    index = jnp.zeros(x.shape, jnp.uint32, out_sharding=jax.typeof(x).sharding)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim, out_sharding=jax.typeof(x).sharding) * stride
        stride *= x.shape[dim]
    return jnp.sum(bits * (index * 2 + 1), dtype=jnp.uint32)


@jax.jit
def _inspect(state) -> tuple[jax.Array, list[jax.Array]]:
    """(all floating arrays finite, one checksum per leaf in jax.tree.leaves order)."""
    leaves = jax.tree.leaves(state)
    finite = jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
                                 or [True]))
    return finite, [_checksum(x) for x in leaves]


def state_digest(state) -> tuple[bool, dict[str, int]]:
    """(every floating array is finite, {leaf path: checksum}) of a state tree of arrays."""
    finite, sums = _inspect(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return bool(finite), {p: int(s) for p, s in zip(paths, sums)}


def _reason(e: BaseException) -> str:
    """One line for an exception: the innermost cause's type and the start of its message (tensorstore's
    messages run to thousands of lines, the outer ones say only which array failed)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).split(" [tensorstore_spec=")[0].strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


class _DropAsyncioShutdownErrors(logging.Filter):
    """Drops asyncio's "unhandled exception during asyncio.run() shutdown" records. When one array of a
    checkpoint cannot be read, orbax's restore raises (reported in one line by restore_newest) and asyncio
    logs every other failed read with its tensorstore spec: 17,647 lines for the tiny model's two damaged
    checkpoints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "during asyncio.run() shutdown" not in record.getMessage()


@dataclasses.dataclass
class Restored:
    """The checkpoint a resume starts from, and the newer ones it skipped: (step, why) pairs."""

    step: int
    state: object
    meta: dict
    skipped: list[tuple[int, str]]


class Checkpointer:
    """Saves every `every` steps (plus forced saves), keeps the `keep` newest."""

    def __init__(self, directory: Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        # The interval is applied here rather than by orbax, which would also save the first step it sees.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints: {_reason(e)}") from None
        self._pending: int | None = None  # the step whose asynchronous save may still be running

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously) if step is due or force; returns whether a save started.

        Raises NonFiniteState if meta["loss"] or any parameter is not finite (the caller stops the run), and
        CheckpointError if this save, or the previous one in the background, failed.
        """
        loss = meta.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteState(f"refusing to checkpoint step {step}: loss is {loss}")
        if not (force or step % self.every == 0):
            return False
        finite, digest = state_digest(state)
        if not finite:
            raise NonFiniteState(f"refusing to checkpoint step {step}: the parameters or optimizer state hold "
                                 "NaN or inf")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave({**meta, "digest": digest}))
        self.wait()  # surfaces a failure of the previous save under its own step
        try:
            started = bool(self._manager.save(step, args=args, force=True))
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {_reason(e)}") \
                from None
        self._pending = step if started else None
        return started

    def restore(self, step: int, abstract_state, data_iter):
        """(state, meta) of checkpoint `step`; data_iter is moved to the saved position in place.

        abstract_state: the state's tree of jax.ShapeDtypeStruct with shardings (where each array goes).
        Raises CheckpointError if the restored arrays do not match the checksums saved with them; orbax's and
        tensorstore's own errors (unreadable files) pass through. Every process must call it (the checksums
        are collectives).
        """
        state, meta = self._read(step, abstract_state, data_iter)
        self._verify(state, meta)
        return state, meta

    def _read(self, step: int, abstract_state, data_iter):
        restored = self._restore_items(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def _restore_items(self, step: int, args: ocp.args.Composite):
        """orbax's restore of `args` from checkpoint `step`, which every process calls and then votes on."""
        quiet = _DropAsyncioShutdownErrors()
        logging.getLogger("asyncio").addFilter(quiet)
        try:
            return self._manager.restore(step, args=args)
        except Exception:
            if jax.process_count() > 1:
                # orbax's restore ends in a collective barrier, where processes that read this step wait; join
                # it, so the vote that follows pairs with their vote (not with that barrier).
                multihost_utils.sync_global_devices(_ORBAX_RESTORE_BARRIER)
            raise
        finally:
            logging.getLogger("asyncio").removeFilter(quiet)

    @staticmethod
    def _verify(state, meta: dict) -> None:
        """Raises CheckpointError if state's arrays differ from the checksums in meta (a collective)."""
        saved = meta.get("digest")
        if saved is not None:  # checkpoints written before checksums existed have none
            _, digest = state_digest(state)
            bad = [path for path, value in digest.items() if saved.get(path) != value]
            if bad:
                raise CheckpointError(f"{len(bad)} of {len(digest)} arrays differ from their saved checksums "
                                      f"(silent corruption), e.g. {bad[0]}")

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose meta (JSON only, no arrays) reads on every process; None
        if none does. Lets a resume be refused before any checkpoint is restored or set aside."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._restore_items(step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception:  # an unreadable meta: restore_newest will say why when it skips this step
                meta = None
            if every_process(meta is not None):
                return step, meta
        return None

    def restore_newest(self, abstract_state, data_iter) -> Restored | None:
        """The newest checkpoint that restores and verifies on every process (None if there are none), with the
        newer ones it skipped and why. Raises CheckpointError naming every checkpoint's failure if none restores.

        The processes agree after reading a step and again after verifying it: a step is skipped by all of them
        if any failed, so none runs the checksum collectives of a step the others left, and all of them reach
        `_set_aside` together."""
        skipped = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            why = None
            try:
                state, meta = self._read(step, abstract_state, data_iter)
            except Exception as e:  # any unreadable checkpoint: try the next older one
                why = _reason(e)
            if every_process(why is None):
                try:
                    self._verify(state, meta)
                except CheckpointError as e:
                    why = _reason(e)
                if every_process(why is None):
                    if skipped:
                        self._set_aside([s for s, _ in skipped])
                    return Restored(step, state, meta, skipped)
            skipped.append((step, why or "another process could not restore it"))
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: "
                                  + "; ".join(f"step {s}: {why}" for s, why in skipped))
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unrestorable checkpoints to <step>.unrestorable (<step>.unrestorable.N if a step was set aside
        before; kept for inspection, orbax ignores the names), so the resumed run can save those steps again.
        Raises CheckpointError on every process if process 0 cannot rename one."""
        error = None
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}.unrestorable"
                n = 1
                while target.exists():
                    target, n = self.directory / f"{step}.unrestorable.{n}", n + 1
                try:
                    (self.directory / str(step)).rename(target)
                except OSError as e:
                    error = f"cannot set aside unrestorable checkpoint step {step} in {self.directory}: {_reason(e)}"
                    break
        if not every_process(error is None):
            raise CheckpointError(error or "process 0 could not set aside the unrestorable checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; raises CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {self._pending} in {self.directory} failed: "
                                  f"{_reason(e)}") from None
        finally:
            self._pending = None

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources; raises CheckpointError if a save failed."""
        try:
            self._manager.close()
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {self._pending} in {self.directory} failed: "
                                  f"{_reason(e)}") from None


def every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective where there are several: all must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def abstract_like(state):
    """The ShapeDtypeStruct tree (shapes, dtypes, shardings) of a state tree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class RunDirLock:
    """An exclusive lock on a run directory: RUN_DIR/.lock, held with flock(2), records "pid host".

    The kernel drops a flock when its process dies however it dies, so a lock left by a killed run is free to
    take: its file still names the dead owner (a clean release empties it), which `acquire` reports. The file
    is never deleted, so two processes can never lock two different files of the same name.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a note if it took over a killed run's lock (or if the filesystem cannot
        lock). Raises RunDirBusy naming the holder's pid and host if a live process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            pid, host = (owner + ["?", "?"])[:2]
            raise RunDirBusy(f"run_dir {str(self.path.parent)!r} is in use by another run (pid {pid} on host "
                             f"{host}); wait for it to end or choose another run_dir") from None
        except OSError as e:  # a filesystem without flock (ENOLCK, EOPNOTSUPP): run, but say it is unguarded
            os.close(fd)
            return (f"run_dir {str(self.path.parent)!r} cannot be locked ({e.strerror}); nothing stops a "
                    "second run from writing into it")
        previous = os.pread(fd, 256, 0).decode(errors="replace").split()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if len(previous) >= 2:
            return (f"took over the lock of run_dir {str(self.path.parent)!r} left by pid {previous[0]} on host "
                    f"{previous[1]}, which ended without releasing it (killed?)")
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
