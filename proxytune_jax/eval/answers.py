"""GSM-style answer extraction and exact match.

Convention (``docs/methods.md`` §3.3): the answer of a completion is the number after the **first** ``####`` marker
(GSM8K's reference format); when there is no marker, the **last** number in the text. Numbers are
normalized before comparison: thousands separators (``1,000``), a leading ``+``, a ``$`` sign and a
trailing period are dropped and decimals are canonicalized (``3.50`` == ``3.5``, ``4.0`` == ``4``,
``-0`` == ``0``). Anything that is not a number after ``####`` counts as no answer (``None``), so it
never matches.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Iterable, Sequence

# A number: optional sign, digits with optional thousands groups, optional decimals; or ".5".
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical string of one number (``"1,000.50"`` -> ``"1000.5"``), or None if it is not a number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))  # "4.00" -> "4", "-0" -> "0"
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalized answer of a completion: the number right after ``####``, else the last number."""
    if "####" in text:
        after = text.split("####", 1)[1]
        match = _NUMBER.search(after.replace("$", ""))
        # The answer must be the first thing after the marker (only spaces may come between).
        if match is None or after.replace("$", "")[: match.start()].strip():
            return None
        return normalize_number(match.group(0))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(prediction: str, reference: str) -> bool:
    """True when both texts have an answer and the answers are equal after normalization."""
    p, r = extract_answer(prediction), extract_answer(reference)
    return p is not None and p == r


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of GSM-style exact matches (answers extracted from both sides)."""
    _check_lengths(predictions, references)
    if not predictions:
        return float("nan")
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def string_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after stripping surrounding whitespace."""
    _check_lengths(predictions, references)
    if not predictions:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def _check_lengths(a: Iterable, b: Iterable) -> None:
    from proxytune_jax.errors import UserError

    if len(a) != len(b):  # type: ignore[arg-type]
        raise UserError(f"got {len(a)} predictions but {len(b)} references: give one reference per prediction")  # type: ignore[arg-type]
