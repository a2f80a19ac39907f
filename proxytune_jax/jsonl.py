"""Reading JSONL files a user passes in: one JSON value per line, blank lines skipped, and every mistake a
:class:`~proxytune_jax.errors.UserError` naming the file and line (``path:line``) and what to write instead."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from proxytune_jax.errors import UserError


def iter_jsonl(path: str | Path, *, what: str, example: str) -> Iterator[tuple[int, object]]:
    """Yield ``(line number, parsed value)`` for the non-blank lines of ``path``.

    ``what`` names the file in the missing-file message ("data file", "prompts file"); ``example`` is the line
    format to suggest (``'{"prompt": "..."}'``). Callers check the values' fields themselves."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass a JSONL file with one {example} per line")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); each line "
                                f"must be one JSON value like {example}") from None


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never a part: a temporary
    file beside it, flushed and fsynced, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path, obj, *, indent: int = 2) -> None:
    """``json.dumps(obj)`` written with ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
