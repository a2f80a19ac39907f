"""Reading JSONL files a user passes in: one JSON value per line, blank lines skipped, and every mistake a
:class:`~proxytune_jax.errors.UserError` naming the file and line (``path:line``) and what to write instead."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from proxytune_jax.errors import UserError


def decode_utf8(raw: bytes, path, lineno: int | None = None) -> str:
    """``raw.decode("utf-8")`` (a leading byte-order mark dropped), or a UserError naming the file, the line and
    the byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        raise UserError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file "
                        "as UTF-8 (e.g. iconv -f latin1 -t utf-8 in > out)") from None
    return text[1:] if lineno in (None, 1) and text.startswith("\ufeff") else text


def read_text_utf8(path, *, what: str = "file") -> str:
    """A whole text file as UTF-8, with the same clear errors as ``iter_jsonl`` for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    return decode_utf8(path.read_bytes(), path)


def read_json_file(path, *, what: str = "JSON file", fix: str = "repair it or write it again") -> object:
    """One JSON document from a file, with a UserError naming the file and ``fix`` when it is missing, not UTF-8
    or not valid JSON (a damaged config.json, an index cut short)."""
    text = read_text_utf8(path, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                        f"{fix}") from None


def iter_jsonl(path: str | Path, *, what: str, example: str) -> Iterator[tuple[int, object]]:
    """Yield ``(line number, parsed value)`` for the non-blank lines of ``path``.

    ``what`` names the file in the missing-file message ("data file", "prompts file"); ``example`` is the line
    format to suggest (``'{"prompt": "..."}'``). Callers check the values' fields themselves."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass a JSONL file with one {example} per line")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); each line "
                                f"must be one JSON value like {example}") from None

