"""Files written whole, atomically: a temporary file beside the target, flushed and fsynced, then renamed over
it (and the folder fsynced), so a crash or a full disk at any moment leaves the old file or the new one, never
a part -- and a failed write removes its temporary file. Appended logs use ``append_line`` (one whole line,
flushed and fsynced; readers drop a torn last line)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Iterator


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems cannot open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync the finished ``tmp`` and rename it over ``path`` (for writers that take a file name, such as
    safetensors' ``save_file``). ``tmp`` is removed if this fails."""
    tmp, path = Path(tmp), Path(path)
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """``with open_atomic(p) as f: f.write(...)``: ``p`` appears (or is replaced) only when the block ends
    without an error; on an error the old ``p`` is untouched and the temporary file is gone."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with open_atomic(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 2) -> None:
    """``json.dumps(obj)`` written with ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one whole line, flushed and fsynced. If the disk fills mid-line, the torn tail is cut off again
    so the file keeps only whole lines."""
    path = Path(path)
    with open(path, "a", encoding="utf-8") as f:
        start = f.tell()
        try:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


__all__ = ["append_line", "commit", "open_atomic", "temporary_name", "write_json_atomic", "write_text_atomic"]
