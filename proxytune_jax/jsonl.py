"""Reading JSONL files a user passes in: one JSON value per line, blank lines skipped, and every mistake a
:class:`~proxytune_jax.errors.UserError` naming the file and line (``path:line``) and what to write instead."""
from __future__ import annotations

import json
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
