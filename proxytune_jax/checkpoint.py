"""Crash-safe training checkpoints on orbax's ``CheckpointManager``.

Layout: ``<directory>/<step>/{state,meta}`` (orbax), one step directory per save. ``state`` is the whole
``TrainState`` (params, optimizer state, step, PRNG key, loss-specific extras); ``meta`` is JSON holding the
data position and anything else the caller wants back (config fingerprint, ...). Saving both together is what
makes a resumed run continue exactly where the killed one was.

Crash safety:
* orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete (``commit_success.txt``
  marks completion on object stores). A run killed at any moment -- also during a save -- leaves at worst such
  a temporary directory, which ``all_steps()`` does not list.
* When a ``Checkpointer`` opens a directory, every incomplete step directory is *moved* (not deleted) into
  ``<directory>/quarantine/`` with a message on stderr; orbax would otherwise silently remove it when the
  step is saved again.
* ``restore_latest`` tries the newest complete step first; a step that fails to restore (corrupt or truncated
  files, a shape that does not match) is reported, moved to the quarantine as well and the next older step is
  tried. Nothing is ever loaded from a step that did not restore cleanly.
* Content checksums: every save stores, in its ``meta``, two 32-bit sums per array of the state (see
  ``tree_checksums``), and every restore recomputes them on the restored arrays. A bit flipped on disk after the
  save -- which orbax's compressed chunks otherwise decode silently into a wrong value -- fails that check, and
  the step is quarantined like any other damaged step; the message names the first array that differs and the
  step that was used instead. Steps written before checksums existed restore unverified.

Resharding: ``restore_latest(abstract_state)`` takes a tree of ``jax.ShapeDtypeStruct`` carrying the
*target* shardings (``training.state.abstract_train_state`` on the new mesh), so a run saved on 8 devices
resumes on 1 and back. (Restoring without a target would silently keep the saved shardings.)
"""
from __future__ import annotations

import dataclasses
import datetime
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from proxytune_jax.errors import UserError
from proxytune_jax.sharding import path_to_str

QUARANTINE = "quarantine"
_TMP_MARK = ".orbax-checkpoint-tmp"
_CHECKSUMS = "_content_checksums"  # meta key; removed from the meta that restore returns
_CHECKSUM_FORMAT = "sum32+possum32/v1"


class ChecksumMismatch(Exception):
    """A restored array's content differs from what was saved (a damaged file)."""


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer (``fmix32``), elementwise on ``uint32``."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``uint32[2]``: the wrapping sum of the array's words and their position-weighted sum.

    The words are the array's bit pattern widened to ``uint32`` (8/16-bit dtypes) or split into ``uint32``
    (64-bit dtypes), in row-major order. Integer sums are exact and associative, so the result does not depend on
    the sharding or the reduction order (a run saved on 8 devices and restored on 1 gets the same numbers). A
    single flipped bit changes the first sum by ``±2**k (mod 2**32) != 0`` and is always detected; swapped or
    otherwise scrambled words change the position-weighted sum with probability about ``1 - 2**-32`` (the
    weights are a hash of the position, so moved blocks of equal sum are seen too).
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit -> a trailing axis of 2 words
    else:
        words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    words = words.reshape(-1)  # [N]
    weights = _mix32(jnp.arange(words.size, dtype=jnp.uint32))  # [N] a pseudo-random weight per position
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


_tree_checksum_arrays = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{path: "xxxxxxxx-xxxxxxxx"}``: ``_leaf_checksum`` of every array leaf, computed where the arrays live
    (one jitted pass over the state; only 8 bytes per array come to the host)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in leaves]
    sums = _tree_checksum_arrays(arrays)
    if any(not s.is_fully_addressable for s in sums):
        from jax.experimental import multihost_utils
        sums = multihost_utils.process_allgather(sums, tiled=True)
    host = jax.device_get(sums)
    return {path_to_str(p): "%08x-%08x" % tuple(int(v) for v in np.asarray(h).reshape(-1)[:2])
            for (p, _), h in zip(leaves, host)}


def _verify(step: int, state: Any, saved: dict | None) -> None:
    if not saved or saved.get("format") != _CHECKSUM_FORMAT:
        return  # written before checksums existed
    now = tree_checksums(state)
    want = saved.get("leaves", {})
    bad = [k for k in want if now.get(k) != want[k]] + [k for k in now if k not in want]
    if bad:
        raise ChecksumMismatch(f"content checksum of {bad[0]} differs from the one saved with step {step}"
                               + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""))


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[checkpoint] {msg}", file=sys.stderr, flush=True)


def _as_saved_tree(tree: Any) -> Any:
    """The nested-dict view orbax stores for a pytree (dataclass nodes become dicts of their fields)."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: _as_saved_tree(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
    if isinstance(tree, dict):
        return {k: _as_saved_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_as_saved_tree(v) for v in tree)
    return tree


def abstract_tree(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (a tree of ``Sharding`` matching ``tree``)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Save every ``save_every`` steps (and whenever ``force=True``, e.g. at the end), keep the last ``keep``.

    Saves are asynchronous when ``async_save`` (arrays are copied to host before ``save`` returns, so the
    caller may donate the state right after); ``close()`` waits for the last one.
    """

    def __init__(self, directory: str | Path, *, save_every: int = 100, keep: int | None = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise UserError(f"save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise UserError(f"keep must be >= 1 (or None for all), got {keep}")
        self.directory = Path(directory).absolute()
        self.save_every, self.keep, self.async_save = save_every, keep, async_save
        self.directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            self._quarantine_incomplete()
        self._open()

    # -- directory hygiene ---------------------------------------------------------------------------------
    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=self.keep, create=True,
            enable_async_checkpointing=self.async_save, cleanup_tmp_directories=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def _quarantine(self, path: Path, why: str) -> Path:
        qdir = self.directory / QUARANTINE
        qdir.mkdir(exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = qdir / f"{path.name}.{stamp}"
        n = 1
        while dest.exists():
            dest, n = qdir / f"{path.name}.{stamp}.{n}", n + 1
        shutil.move(str(path), str(dest))
        _say(f"{why}: {path} was NOT loaded; moved to {dest} (inspect it, then delete it to free the space)")
        return dest

    def _quarantine_incomplete(self) -> None:
        for entry in sorted(self.directory.iterdir()):
            if entry.is_dir() and _TMP_MARK in entry.name:
                self._quarantine(entry, "incomplete checkpoint (a save was interrupted)")

    # -- API --------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Save ``state`` (+ JSON ``meta``) as ``step`` if it is a save step (or ``force``). Returns whether a
        save was started."""
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False  # not a save step, or already saved (the final step may equal a periodic one)
        meta = dict(meta or {})
        meta[_CHECKSUMS] = {"format": _CHECKSUM_FORMAT, "leaves": tree_checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        meta = dict(out.meta or {})
        _verify(step, out.state, meta.pop(_CHECKSUMS, None))
        return out.state, meta

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """``(state, meta, step)`` from the newest step that restores cleanly, or ``None`` if there is none.
        Steps that fail are reported and quarantined (see the module docstring)."""
        self.wait()
        refused: list[int] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = self.directory / str(step)
            self._check_matches(step, abstract_state)
            try:
                state, meta = self.restore(step, abstract_state)
                jax.block_until_ready(state)
                if refused:
                    _say(f"using step {step}, the newest step that restored cleanly (refused: "
                         f"{', '.join(map(str, refused))}; see {self.directory / QUARANTINE})")
                return state, meta, step
            except Exception as err:  # noqa: BLE001 -- any failure means: do not use this step
                if jax.process_count() > 1:
                    raise  # processes must agree; let the user look at it
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                self._manager.close()
                self._quarantine(path, f"checkpoint step {step} is corrupt or does not match ({msg})")
                refused.append(step)
                self._open()
        if refused:
            _say(f"no checkpoint step restored cleanly (refused: {', '.join(map(str, refused))}); starting over")
        return None

    def _check_matches(self, step: int, abstract_state: Any) -> None:
        """A readable checkpoint whose tree or shapes differ from ``abstract_state`` was made by another
        configuration: that is the user's mistake to fix, not corruption, so raise instead of skipping."""
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = {path_to_str(p): tuple(m.shape) for p, m in
                     jax.tree_util.tree_flatten_with_path(getattr(saved, "tree", saved))[0]}
        except Exception:  # noqa: BLE001 -- unreadable metadata: let restore() find and report the damage
            return
        if not saved:
            return
        want = {path_to_str(p): tuple(x.shape) for p, x in
                jax.tree_util.tree_flatten_with_path(_as_saved_tree(abstract_state))[0]}
        diffs = [f"{k}: missing in checkpoint" for k in want if k not in saved]
        diffs += [f"{k}: not in this run's state" for k in saved if k not in want]
        diffs += [f"{k}: saved {saved[k]}, expected {want[k]}" for k in want if k in saved and saved[k] != want[k]]
        if diffs:
            raise UserError(
                f"checkpoint step {step} in {self.directory} was written by a different model, optimizer, "
                f"objective or proxytune_jax version ({len(diffs)} differences, e.g. {'; '.join(diffs[:3])}); "
                "resume with the configuration and version that wrote it (or export its params with that "
                "version's save_pretrained and start from the Hugging Face folder), or use a new --workdir")

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_complete(step_dir: str | Path) -> bool:
    """Whether an orbax step directory is finalized (not a temporary directory of an interrupted save)."""
    step_dir = Path(step_dir)
    return step_dir.is_dir() and _TMP_MARK not in step_dir.name and (
        (step_dir / "commit_success.txt").exists() or (step_dir / "_CHECKPOINT_METADATA").exists())


__all__ = ["Checkpointer", "ChecksumMismatch", "abstract_tree", "is_complete", "tree_checksums", "QUARANTINE"]
