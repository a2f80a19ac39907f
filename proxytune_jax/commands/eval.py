"""`proxytune eval`: score generation outputs (JSONL) against references (JSONL).

Rows are paired by their ``id`` field when every row of both files has one, else by line order. The text of a
row is the field named by ``--prediction-field`` / ``--reference-field``, or the first present of
``completion, prediction, output, generation, response, text`` (predictions) and
``answer, reference, target, completion, output, response, text`` (references).

Metrics: ``accuracy`` (GSM-style: number after ``####``, else the last number; exact match of the numbers),
``exact_match`` (whole strings after stripping whitespace), ``rouge`` (ROUGE-1/2/L F1 via ``rouge-score``).
"""
from __future__ import annotations

from pathlib import Path

from proxytune_jax.errors import UserError
from proxytune_jax.atomic import write_json_atomic
from proxytune_jax.eval.scoring import METRICS, score  # noqa: F401  (score: imported by callers from here too)
from proxytune_jax.jsonl import iter_jsonl
PREDICTION_FIELDS = ("completion", "prediction", "output", "generation", "response", "text")
REFERENCE_FIELDS = ("answer", "reference", "target", "completion", "output", "response", "text")


def add_arguments(parser):
    parser.add_argument("--predictions", required=True, type=Path, help="JSONL of generation outputs")
    parser.add_argument("--references", required=True, type=Path, help="JSONL of references")
    parser.add_argument("--metric", nargs="+", default=["accuracy"], choices=METRICS,
                        help="metrics to compute (default: accuracy)")
    parser.add_argument("--prediction-field", default=None, help="field holding the prediction text")
    parser.add_argument("--reference-field", default=None, help="field holding the reference text")
    parser.add_argument("--output", type=Path, default=None, help="also write the scores as JSON here")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a predictions/references file; a bare JSON value on a line is read as ``{"text": value}``."""
    return [row if isinstance(row, dict) else {"text": row}
            for _, row in iter_jsonl(path, what="JSONL file", example='{"text": "..."}')]


def pick_field(rows: list[dict], field: str | None, candidates: tuple[str, ...], path: Path) -> str:
    if not rows:
        raise UserError(f"{path} has no rows")
    if field is not None:
        missing = [i for i, r in enumerate(rows) if field not in r]
        if missing:
            raise UserError(f"{path}: row {missing[0] + 1} has no field {field!r}: check --prediction-field/--reference-field")
        return field
    for name in candidates:
        if all(name in r for r in rows):
            return name
    raise UserError(f"{path}: no text field found among {', '.join(candidates)} in every row: "
                    "name it with --prediction-field/--reference-field")


def _ids(rows: list[dict], path: Path) -> dict:
    """``{id: row}``; every row must carry a distinct str/int id."""
    seen: dict = {}
    for i, r in enumerate(rows, start=1):
        if "id" not in r:
            raise UserError(f"{path}: row {i} has no 'id' but other rows have one; give every row of both files "
                            "an id, or none (rows are then paired by line)")
        key = r["id"]
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise UserError(f"{path}: row {i} has id {key!r}; ids must be strings or integers")
        if key in seen:
            raise UserError(f"{path}: id {key!r} appears on rows {seen[key][0]} and {i}; each id must appear once")
        seen[key] = (i, r)
    return {k: r for k, (_, r) in seen.items()}


def pair(preds: list[dict], refs: list[dict], pf: str, rf: str, paths: tuple[Path, Path] = (Path("predictions"),
         Path("references"))) -> tuple[list[str], list[str]]:
    """Pair rows by ``id`` when any row has one (then every row of both files must, each id once, and both files
    must cover the same ids), else by line order (then both files must have the same number of rows)."""
    if any("id" in r for r in preds) or any("id" in r for r in refs):
        by_p, by_r = _ids(preds, paths[0]), _ids(refs, paths[1])
        for a, b, pa, pb, what in ((by_p, by_r, *paths, "reference"), (by_r, by_p, paths[1], paths[0], "prediction")):
            extra = [k for k in a if k not in b]
            if extra:
                raise UserError(f"{pa}: id {extra[0]!r} has no {what} in {pb} ({len(extra)} of {len(a)} ids are not "
                                f"in both files); score files that cover the same ids")
        return [str(by_p[k][pf]) for k in by_p], [str(by_r[k][rf]) for k in by_p]
    if len(preds) != len(refs):
        raise UserError(f"{len(preds)} predictions but {len(refs)} references and no 'id' fields to pair them")
    return [str(p[pf]) for p in preds], [str(r[rf]) for r in refs]


def run(args) -> int:
    preds, refs = read_jsonl(args.predictions), read_jsonl(args.references)
    pf = pick_field(preds, args.prediction_field, PREDICTION_FIELDS, args.predictions)
    rf = pick_field(refs, args.reference_field, REFERENCE_FIELDS, args.references)
    p, r = pair(preds, refs, pf, rf, (args.predictions, args.references))
    scores = score(p, r, args.metric)
    width = max(len(k) for k in scores)
    for k, v in scores.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output, scores)
    return 0
