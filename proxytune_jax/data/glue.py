"""GLUE and SuperGLUE tasks (the SinKD paper's benchmarks) from the published Hugging Face parquet exports.

Formats accepted: the ``nyu-mll/glue`` / ``aps/super_glue`` parquet exports (e.g.
``sst2/validation-00000-of-00001.parquet``) or the same fields in JSON/JSONL (the SuperGLUE release ships
``val.jsonl`` files with the same field names; ``label`` may then be a string like ``"entailment"`` or a
bool, both are mapped to the class index). Test splits carry no labels (``-1``): use validation.

Causal LMs classify by **verbalizer**: each task renders its fields into a prompt ending in ``"Answer:"`` and
names one label word per class (our prompt wording; the SinKD paper fine-tunes BERT-style classifiers with a
classification head). The class logits are the next-token logits at the last prompt position gathered at the
first token of ``" " + word`` (:func:`verbalizer_token_ids`); SinKD then compares the N×C class
distributions of a batch. STS-B is regression: words ``"0"…"5"``, prediction = expected value of the
softmax over them.

Metrics (GLUE's official choice per task, :func:`glue_metrics`): accuracy (SST-2, MNLI, QNLI, RTE, WNLI,
BoolQ, COPA, WiC), accuracy + F1 of class 1 (MRPC, QQP), Matthews correlation (CoLA), Pearson + Spearman
(STS-B), accuracy + macro-F1 (CB).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, user_turn
from proxytune_jax.errors import UserError


@dataclass(frozen=True)
class GlueTask:
    """One classification task: input fields, prompt template, label words (index = class id), metrics."""

    name: str
    benchmark: str  # "glue" or "super_glue"
    fields: tuple[str, ...]
    template: str  # str.format over the fields
    label_words: tuple[str, ...]
    metrics: tuple[str, ...]
    label_names: tuple[str, ...] = ()  # string labels of JSONL releases, index = class id
    regression: bool = False


_ENTAIL = "Question: Does the premise entail the hypothesis?\nAnswer:"
GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "glue", ("sentence",),
             "Sentence: {sentence}\nQuestion: Is this sentence grammatically acceptable?\nAnswer:",
             ("no", "yes"), ("matthews",), ("unacceptable", "acceptable")),
    GlueTask("sst2", "glue", ("sentence",),
             "Sentence: {sentence}\nQuestion: Is the sentiment of this sentence positive or negative?\nAnswer:",
             ("negative", "positive"), ("accuracy",), ("negative", "positive")),
    GlueTask("mrpc", "glue", ("sentence1", "sentence2"),
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
             ("no", "yes"), ("accuracy", "f1"), ("not_equivalent", "equivalent")),
    GlueTask("qqp", "glue", ("question1", "question2"),
             "Question 1: {question1}\nQuestion 2: {question2}\nQuestion: Do both questions ask the same thing?\nAnswer:",
             ("no", "yes"), ("accuracy", "f1"), ("not_duplicate", "duplicate")),
    GlueTask("stsb", "glue", ("sentence1", "sentence2"),
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: How similar are the two sentences, "
             "from 0 to 5?\nAnswer:", ("0", "1", "2", "3", "4", "5"), ("pearson", "spearman"), regression=True),
    GlueTask("mnli", "glue", ("premise", "hypothesis"),
             "Premise: {premise}\nHypothesis: {hypothesis}\nQuestion: Does the premise entail the hypothesis? "
             "yes, maybe, or no?\nAnswer:", ("yes", "maybe", "no"), ("accuracy",),
             ("entailment", "neutral", "contradiction")),
    GlueTask("qnli", "glue", ("question", "sentence"),
             "Question: {question}\nSentence: {sentence}\nQuestion: Does the sentence answer the question?\nAnswer:",
             ("yes", "no"), ("accuracy",), ("entailment", "not_entailment")),
    GlueTask("rte", "glue", ("sentence1", "sentence2"), "Premise: {sentence1}\nHypothesis: {sentence2}\n" + _ENTAIL,
             ("yes", "no"), ("accuracy",), ("entailment", "not_entailment")),
    GlueTask("wnli", "glue", ("sentence1", "sentence2"), "Premise: {sentence1}\nHypothesis: {sentence2}\n" + _ENTAIL,
             ("no", "yes"), ("accuracy",), ("not_entailment", "entailment")),
    GlueTask("boolq", "super_glue", ("question", "passage"),
             "Passage: {passage}\nQuestion: {question}?\nAnswer:", ("no", "yes"), ("accuracy",), ("False", "True")),
    GlueTask("cb", "super_glue", ("premise", "hypothesis"),
             "Premise: {premise}\nHypothesis: {hypothesis}\nQuestion: Does the premise entail the hypothesis? "
             "yes, no, or maybe?\nAnswer:", ("yes", "no", "maybe"), ("accuracy", "macro_f1"),
             ("entailment", "contradiction", "neutral")),
    GlueTask("rte_superglue", "super_glue", ("premise", "hypothesis"),
             "Premise: {premise}\nHypothesis: {hypothesis}\n" + _ENTAIL, ("yes", "no"), ("accuracy",),
             ("entailment", "not_entailment")),
    GlueTask("copa", "super_glue", ("premise", "choice1", "choice2", "question"),
             "Premise: {premise}\nQuestion: What was the {question}?\nOption 1: {choice1}\nOption 2: {choice2}\n"
             "Answer: Option", ("1", "2"), ("accuracy",)),
    GlueTask("wic", "super_glue", ("word", "sentence1", "sentence2"),
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word '{word}' used with the same "
             "meaning in both sentences?\nAnswer:", ("no", "yes"), ("accuracy",), ("False", "True")),
]}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")  # "SST-2" -> "sst2"
    if key not in GLUE_TASKS:
        raise UserError(f"unknown GLUE/SuperGLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _label(task: GlueTask, value, index: int):
    if task.regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{task.name}: record {index} label {value!r} is not a number") from None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        if value in task.label_names:
            return task.label_names.index(value)
        raise UserError(f"{task.name}: record {index} label {value!r} is not one of {list(task.label_names)}")
    value = int(value)
    if value == -1:
        raise UserError(f"{task.name}: record {index} has label -1 (an unlabeled test split); use the validation split")
    if not 0 <= value < len(task.label_words):
        raise UserError(f"{task.name}: record {index} label {value} outside 0..{len(task.label_words) - 1}")
    return value


def load_glue(
    task_name: str, path: str, *, split: str | None = "validation", max_examples: int | None = None,
) -> list[PromptExample]:
    """A GLUE/SuperGLUE task as verbalized prompts; reference = class index (float for STS-B)."""
    task = get_task(task_name)
    if os.path.isfile(os.fspath(path)):
        split = None
    ds = take(load_records(path, dataset=f"{task.benchmark}/{task.name}", required=task.fields + ("label",),
                           split=split), max_examples)
    out = []
    for i, r in enumerate(ds):
        values = {f: str(r[f]).strip() for f in task.fields}
        prompt = task.template.format(**values)
        out.append(PromptExample(
            id=str(r.get("idx") if r.get("idx") is not None else i), prompt=prompt, messages=user_turn(prompt),
            response_prefix="", reference=_label(task, r["label"], i),
            meta={"task": task.name, "label_words": list(task.label_words)},
        ))
    return out


def verbalizer_token_ids(task: GlueTask | str, tokenizer) -> list[int]:
    """The first token id of ``" " + word`` for each label word; UserError if two classes share a token."""
    task = get_task(task) if isinstance(task, str) else task
    ids = []
    for word in task.label_words:
        toks = tokenizer.encode(" " + word, add_special_tokens=False)
        if not toks:
            raise UserError(f"{task.name}: the tokenizer maps label word {word!r} to no token")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise UserError(
            f"{task.name}: label words {list(task.label_words)} share first tokens {ids} under this tokenizer; "
            "pick a tokenizer that splits them apart"
        )
    return ids


# ----------------------------------------------------------------------------------------------- metrics
def _f1(pred: np.ndarray, gold: np.ndarray, positive: int) -> float:
    tp = float(np.sum((pred == positive) & (gold == positive)))
    fp = float(np.sum((pred == positive) & (gold != positive)))
    fn = float(np.sum((pred != positive) & (gold == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def matthews_corrcoef(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary Matthews correlation; 0 when a marginal is constant (sklearn's convention)."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def glue_metrics(task: GlueTask | str, predictions: Sequence, labels: Sequence) -> dict:
    """The task's official metrics. ``predictions``: class ids (floats for STS-B)."""
    task = get_task(task) if isinstance(task, str) else task
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.shape != gold.shape or pred.ndim != 1 or len(pred) == 0:
        raise UserError(f"{task.name}: need equal-length non-empty 1-D predictions and labels, "
                        f"got {pred.shape} and {gold.shape}")
    out: dict = {}
    for m in task.metrics:
        if m == "accuracy":
            out[m] = float(np.mean(pred == gold))
        elif m == "f1":
            out[m] = _f1(pred, gold, positive=1)
        elif m == "macro_f1":
            out[m] = float(np.mean([_f1(pred, gold, c) for c in range(len(task.label_words))]))
        elif m == "matthews":
            out[m] = matthews_corrcoef(pred, gold)
        elif m == "pearson":
            out[m] = _pearson(pred.astype(np.float64), gold.astype(np.float64))
        elif m == "spearman":
            out[m] = _pearson(_rank(pred.astype(np.float64)), _rank(gold.astype(np.float64)))
    out["n"] = int(len(pred))
    return out


def predictions_from_class_logits(task: GlueTask | str, class_logits) -> np.ndarray:
    """Class ids (argmax) or, for STS-B, the expected score Σ_k k·softmax(logits)_k. ``class_logits`` [N, C]."""
    task = get_task(task) if isinstance(task, str) else task
    z = np.asarray(class_logits, dtype=np.float64)
    if task.regression:
        z = z - z.max(axis=-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        return p @ np.arange(z.shape[-1], dtype=np.float64)
    return z.argmax(axis=-1)
