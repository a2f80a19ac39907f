"""Reading local evaluation files (JSON, JSONL, Parquet, CSV) through the `datasets` library.

Only local paths are accepted: nothing is ever downloaded from the Hugging Face hub. A path may be one file or
a folder; a folder is searched for the usual published names of the requested split (``test.jsonl``,
``validation-00000-of-00001.parquet``, ...). Every user mistake (missing file, unreadable file, missing
fields) raises :class:`proxytune_jax.errors.UserError` naming the fields the loader expects.
"""
from __future__ import annotations

import glob
import os
from typing import Sequence

from proxytune_jax.errors import UserError

# file suffix -> `datasets` packaged builder
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def builder_for(path: str) -> str:
    """The `datasets` builder ("json", "parquet", "csv") for a file, from its suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _BUILDERS:
        raise UserError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"give a {', '.join(sorted(_BUILDERS))} file"
        )
    return _BUILDERS[suffix]


def resolve_data_files(path: str, *, split: str | None, dataset: str) -> list[str]:
    """The data files behind ``path``: the file itself, or the files of ``split`` inside a folder.

    In a folder, files are matched by the published naming conventions: ``{split}.jsonl``/``.json``/
    ``.parquet``/``.csv`` (GitHub releases, e.g. GSM8K's ``test.jsonl``) and ``{split}-*.parquet`` or
    ``*/{split}-*.parquet`` (Hugging Face parquet exports). Without ``split`` every supported file is used.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{dataset}: no such file or folder {path!r}; give the path of a local copy of the data")
    if os.path.isfile(path):
        builder_for(path)
        return [path]
    patterns: list[str]
    if split is None:
        patterns = [f"*{suffix}" for suffix in _BUILDERS]
    else:
        patterns = [f"{split}{suffix}" for suffix in _BUILDERS]
        patterns += [f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"{split}*.jsonl"]
    found: list[str] = []
    for pattern in patterns:
        for f in sorted(glob.glob(os.path.join(path, pattern))):
            if f not in found and os.path.isfile(f):
                found.append(f)
    if not found:
        wanted = f"split {split!r} " if split else ""
        raise UserError(
            f"{dataset}: found no {wanted}data file in folder {path!r} "
            f"(looked for {', '.join(patterns)}); give the file path directly"
        )
    folders = sorted({os.path.dirname(f) for f in found})
    if len(folders) > 1:  # e.g. TruthfulQA's generation/ and multiple_choice/ exports side by side
        raise UserError(
            f"{dataset}: {path!r} holds data files in several subfolders ({', '.join(os.path.relpath(d, path) for d in folders)}); "
            "give the subfolder (or the file) you mean"
        )
    builders = {builder_for(f) for f in found}
    if len(builders) > 1:
        raise UserError(f"{dataset}: folder {path!r} mixes file types {sorted(builders)}; give one file")
    return found


def load_records(
    path: str,
    *,
    dataset: str,
    required: Sequence[str] | Sequence[Sequence[str]],
    split: str | None = None,
):
    """Load a local file (or folder, see :func:`resolve_data_files`) as a `datasets.Dataset`.

    ``required`` lists the fields every record must have; an entry may be a tuple of alternatives (any one
    suffices, e.g. ``("answers", "answer")`` for TriviaQA's two published layouts). A file that cannot be
    parsed, or lacks a field, raises UserError naming the expected fields.
    """
    import datasets  # imported lazily: it is slow to import

    files = resolve_data_files(path, split=split, dataset=dataset)
    builder = builder_for(files[0])
    expected = ", ".join("/".join(r) if not isinstance(r, str) else r for r in required)
    if builder == "json" and files[0].endswith(".json"):
        _check_json_array_or_lines(files[0], dataset=dataset, expected=expected)
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", keep_in_memory=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(
            f"{dataset}: could not read {files[0]!r} as {builder.upper()} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected records with fields: {expected}"
        ) from None
    columns = set(ds.column_names)
    missing = []
    for r in required:
        alternatives = (r,) if isinstance(r, str) else tuple(r)
        if not columns.intersection(alternatives):
            missing.append(" or ".join(alternatives))
    if missing:
        raise UserError(
            f"{dataset}: {files[0]!r} lacks field(s) {', '.join(missing)} (has: {', '.join(sorted(columns))}); "
            f"expected records with fields: {expected}"
        )
    if len(ds) == 0:
        raise UserError(f"{dataset}: {files[0]!r} holds no records; expected records with fields: {expected}")
    return ds


def _check_json_array_or_lines(path: str, *, dataset: str, expected: str) -> None:
    """A ``.json`` file must hold an array of records (AlpacaEval) or JSON lines; catch a dict-of-lists early."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip()
    if not head:
        raise UserError(f"{dataset}: {path!r} is empty; expected records with fields: {expected}")
    if head[:1] not in (b"[", b"{"):
        raise UserError(
            f"{dataset}: {path!r} is not JSON (starts with {head[:20]!r}); expected records with fields: {expected}"
        )


def take(ds, max_examples: int | None):
    """The first ``max_examples`` records (all when None)."""
    if max_examples is None or max_examples >= len(ds):
        return ds
    if max_examples < 1:
        raise UserError(f"max_examples must be >= 1, got {max_examples}")
    return ds.select(range(max_examples))
