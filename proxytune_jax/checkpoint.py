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
import orbax.checkpoint as ocp

from proxytune_jax.errors import UserError
from proxytune_jax.sharding import path_to_str

QUARANTINE = "quarantine"
_TMP_MARK = ".orbax-checkpoint-tmp"


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
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {})))
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        return out.state, dict(out.meta or {})

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """``(state, meta, step)`` from the newest step that restores cleanly, or ``None`` if there is none.
        Steps that fail are reported and quarantined (see the module docstring)."""
        self.wait()
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = self.directory / str(step)
            self._check_matches(step, abstract_state)
            try:
                state, meta = self.restore(step, abstract_state)
                jax.block_until_ready(state)
                return state, meta, step
            except Exception as err:  # noqa: BLE001 -- any failure means: do not use this step
                if jax.process_count() > 1:
                    raise  # processes must agree; let the user look at it
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                self._manager.close()
                self._quarantine(path, f"checkpoint step {step} is corrupt or does not match ({msg})")
                self._open()
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


__all__ = ["Checkpointer", "abstract_tree", "is_complete", "QUARANTINE"]
