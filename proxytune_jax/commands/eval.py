"""`proxytune eval`: score generation outputs (JSONL) against references (JSONL).

Rows are paired by their ``id`` field when every row of both files has one, else by line order. The text of a
row is the field named by ``--prediction-field`` / ``--reference-field``, or the first present of
``completion, prediction, output, generation, response, text`` (predictions) and
``answer, reference, target, completion, output, response, text`` (references).

Metrics: ``accuracy`` (GSM-style: number after ``####``, else the last number; exact match of the numbers),
``exact_match`` (whole strings after stripping whitespace), ``rouge`` (ROUGE-1/2/L F1 via ``rouge-score``).
"""
from __future__ import annotations

import json
from pathlib import Path

from proxytune_jax.errors import UserError
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


def pair(preds: list[dict], refs: list[dict], pf: str, rf: str) -> tuple[list[str], list[str]]:
    if all("id" in r for r in preds) and all("id" in r for r in refs):
        by_id = {r["id"]: r for r in refs}
        missing = [p["id"] for p in preds if p["id"] not in by_id]
        if missing:
            raise UserError(f"prediction id {missing[0]!r} has no reference with the same id")
        return [str(p[pf]) for p in preds], [str(by_id[p["id"]][rf]) for p in preds]
    if len(preds) != len(refs):
        raise UserError(f"{len(preds)} predictions but {len(refs)} references and no 'id' fields to pair them")
    return [str(p[pf]) for p in preds], [str(r[rf]) for r in refs]


def run(args) -> int:
    preds, refs = read_jsonl(args.predictions), read_jsonl(args.references)
    pf = pick_field(preds, args.prediction_field, PREDICTION_FIELDS, args.predictions)
    rf = pick_field(refs, args.reference_field, REFERENCE_FIELDS, args.references)
    p, r = pair(preds, refs, pf, rf)
    scores = score(p, r, args.metric)
    width = max(len(k) for k in scores)
    for k, v in scores.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(scores, indent=2) + "\n")
    return 0
