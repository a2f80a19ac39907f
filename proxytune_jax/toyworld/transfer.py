"""A distillation regime in the toy world where the teacher knows what the gold labels cannot teach: the
standard knowledge-distillation setting with a *transfer set* (Hinton, Vinyals & Dean 2015, "Distilling the
Knowledge in a Neural Network", §2-3: a few labeled examples plus unlabeled inputs that the teacher labels;
the student is evaluated on held-out inputs), with the two sequence-model variants of Kim & Rush 2016
("Sequence-Level Knowledge Distillation"): word-level KD (match the teacher's next-token distribution at
every position) and sequence-level KD (train on the teacher's greedy outputs).

The regime (fixed here, before any method was compared; every number is a constant of ``TransferConfig``):

- **gold** (labeled): the first ``n_gold`` instruction examples of ``world.tune`` (questions about *tuning*
  people, gold worked answers). They teach the answer format; they carry no fact about the people evaluated.
- **transfer set** (unlabeled): one single-person prompt ``"how many coins does X have ?"`` for each of
  ``n_transfer_people`` *transfer people*, drawn (seeded) from ``world.heldout_people`` -- people the
  instruction data never asks about and whose coin counts the teacher (tuned-large) knows from pretraining
  and the student (base-small, hidden 24) mostly does not. The prompts carry **no** answer: the teacher
  labels them (``teacher_label``): its greedy answers are the targets of sequence-level KD, and its logits on
  those prompt + answer sequences are the targets of word-level KD.
- **evaluation** (held-out phrasing of covered facts): ``n_eval`` distinct *two-person* questions
  ``"how many coins do X and Y have ?"`` about ordered pairs of transfer people, scored against the world's
  gold worked answers. No evaluation prompt is a transfer prompt: the question form differs, the answer
  states each fact in a new position (the second person's count follows another statement) and adds a sum
  line. Why this direction and not the reverse (pair prompts in the transfer set, single questions as the
  evaluation): single questions are just the first sentence of a pair answer, so every single-question
  answer would be a prefix-shaped copy of transfer text; pair questions also give many distinct evaluation
  items (``P·(P−1)`` ordered pairs instead of ``P``), hence a usable bootstrap interval over questions.
- **dev** (labeled, never trained on, never evaluated): the world's held-out questions that mention no
  transfer person. Used only to fit FIRST's teacher temperature (``fit_temperature``), so no method sees the
  evaluation gold.
- ``n_transfer_people`` is set from a capacity check (seq-level KD alone, the student's ability to absorb the
  facts at all), run before the methods were compared, with the rule declared before it: the largest P at
  which seq-level KD (300 steps, batch 32, seeds 0-2) reproduces >= 75% of the teacher's correct labels on
  the transfer prompts. World seed 0, greedy accuracy on the transfer prompts (teacher's label accuracy):
  P=200 0.227 (0.920), P=100 0.477 (0.910), P=50 0.740 (0.920), P=25 0.880 (0.880) -> P = 50.

Known limit of the evaluation (measured in the same check, before the comparison): tuned-large answers the
two-person questions about transfer people at only 0.24-0.31 greedy accuracy (it often copies the second
name wrong), although it recalls every coin count when the gold names are given (teacher-forced fact recall
1.00). So greedy accuracy on this evaluation is capped by name copying, not by knowledge, and the
teacher-forced ``fact_recall`` (top-1 accuracy at the count tokens, added before the methods were compared)
is reported beside it as the direct measure of the transferred facts.

Mixed objective (for the training code, which lives elsewhere): each batch is drawn uniformly from one
dataset holding the gold rows and the transfer rows, with a per-row flag ``is_gold``. The loss is
``L = CE(gold rows' response tokens) + D(transfer rows' response tokens)``, each term a mean over its own
tokens in the batch (0 when the batch has none), weight 1 each; ``D`` is the method's transfer loss (forward
KL to the teacher's logits for ``word_kd``; CE on the teacher's greedy tokens for ``seq_kd``). ``sft_gold``
trains on the gold rows only. So ``seq_kd`` and ``word_kd`` see identical sequences and differ only in
``D``: seq-level vs word-level KD separates "more data" (the teacher's answers) from "the loss" (its full
distribution).

Metrics (``teacher_forced_stats``), teacher-forced on the evaluation gold sequences (chat prompt + gold
answer + ``<eos>``), over response tokens: NLL per token, ECE of the top-1 prediction (10 equal-width bins,
``proxytune_jax.eval.calibration``'s convention), top-1 agreement with the teacher's argmax, and
``KL(teacher‖student)`` per token (temperature 1). Accuracy: GSM-style exact match of greedy generations
(``toyworld.evaluate.generate``). ``summarize``: mean ± std (ddof 1) over seeds, and a bootstrap 95%
interval over *questions* (percentile, ``n_boot`` resamples of the evaluation questions) with the seeds
**pooled** per question (the per-question sums of all seeds; equal to averaging the seeds' predictions per
question since every seed scores the same tokens). ``paired_difference`` gives the interval of a difference
between two methods on the same resamples.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np

from proxytune_jax.toyworld.world import Question, World, make_question

# Declared before any method was run on this regime: the comparison the regime is built to test.
PRIMARY_COMPARISON = ("word_kd", "sft_gold")
# Secondary readings (each reported with a one-line reading, whatever the runs show).
SECONDARY_COMPARISONS = (
    ("seq_kd", "sft_gold"),  # does the teacher's text alone transfer the facts ("more data")
    ("word_kd", "seq_kd"),  # word-level vs sequence-level KD ("the loss")
    ("first_top5", "first_top5_tau1"),  # FIRST: calibrated vs uncalibrated top-k teacher, on ECE
    ("sinkd", "word_kd"),  # SinKD vs plain forward KL
    ("bayesian", "seq_kd"),  # Bayesian KD vs SFT on the teacher's text (same CE targets)
    # GKD's grid and TAID (experiments/toyworld_gkd.py), declared with the objectives, before their runs
    ("gkd_on_policy", "word_kd"),  # the student's own samples vs the teacher's fixed answers, same loss
    ("gkd_mixed", "word_kd"),
    ("gkd_on_policy_jsd", "gkd_on_policy"),  # GKD's divergence vs forward KL on the same on-policy data
    ("taid", "word_kd"),  # the interpolated teacher vs the teacher itself
)
ECE_BINS = 10


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Sizes of the regime (all fixed before the method comparison; ``seed`` draws people and pairs)."""

    n_gold: int = 200  # labeled instruction examples (first of world.tune: tuning people only)
    # Transfer people: set from the capacity check before the methods were compared (module docstring):
    # how many facts base-small absorbs from the teacher's answers in 300 steps.
    n_transfer_people: int = 50
    n_eval: int = 200  # distinct two-person evaluation questions about transfer people
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TransferSplits:
    gold: tuple[Question, ...]  # labeled (tuning people)
    transfer_people: tuple[str, ...]
    transfer: tuple[Question, ...]  # unlabeled prompts (answer "" and target -1: the teacher labels them)
    eval: tuple[Question, ...]  # gold-labeled two-person questions about transfer people
    dev: tuple[Question, ...]  # gold-labeled held-out questions about non-transfer people (temperature fit)


def unlabeled(question: Question) -> Question:
    """The prompt alone: the gold answer and value removed."""
    return dataclasses.replace(question, answer="", target=-1)


def make_splits(world: World, config: TransferConfig = TransferConfig()) -> TransferSplits:
    """The gold / transfer / evaluation / dev splits of ``world`` (deterministic in ``config.seed``)."""
    if config.n_gold > len(world.tune):
        raise ValueError(f"n_gold={config.n_gold} > {len(world.tune)} instruction examples")
    if config.n_transfer_people > len(world.heldout_people):
        raise ValueError(f"n_transfer_people={config.n_transfer_people} > {len(world.heldout_people)} held-out people")
    rng = random.Random(config.seed)
    people = sorted(rng.sample(list(world.heldout_people), config.n_transfer_people))
    transfer = tuple(unlabeled(make_question((p,), world.coins)) for p in people)
    pairs = [(a, b) for a in people for b in people if a != b]
    if config.n_eval > len(pairs):
        raise ValueError(f"n_eval={config.n_eval} > {len(pairs)} ordered pairs of transfer people")
    evaluation = tuple(make_question(ab, world.coins) for ab in rng.sample(pairs, config.n_eval))
    chosen = set(people)
    dev = tuple(q for q in world.heldout if not chosen.intersection(q.names))
    return TransferSplits(tuple(world.tune[:config.n_gold]), tuple(people), transfer, evaluation, dev)


def teacher_label(teacher, tokenizer, prompts: Sequence[Question], *, batch_size: int | None = None) -> list[str]:
    """The teacher's greedy answers to ``prompts`` (chat template), whitespace-stripped: the transfer set's
    labels for sequence-level KD and the sequences word-level KD is teacher-forced on."""
    from proxytune_jax.toyworld.evaluate import generate

    out = generate([teacher], tokenizer, list(prompts), chat=[True], batch_size=batch_size)
    return [c.strip() for c in out.completions]


def encode_rows(tokenizer, gold: Sequence[Question], transfer: Sequence[Question] = (),
                transfer_answers: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """One left-padded dataset: gold rows (gold answers) then transfer rows (``transfer_answers``: the
    teacher's), with ``is_gold [N]`` (1 = gold row). Response tokens + ``<eos>`` are in ``loss_mask``."""
    from proxytune_jax.toyworld.data import concat, encode_instructions

    if len(transfer) != len(transfer_answers):
        raise ValueError("one teacher answer per transfer prompt")
    parts = [encode_instructions(tokenizer, list(gold))]
    if transfer:
        parts.append(encode_instructions(tokenizer, list(transfer), responses=list(transfer_answers)))
    rows = concat(*parts) if len(parts) > 1 else dict(parts[0])
    rows["is_gold"] = np.concatenate([np.ones(len(gold), np.int32), np.zeros(len(transfer), np.int32)])
    return rows


def response_mask(rows: dict[str, np.ndarray]) -> np.ndarray:
    """``[N, T-1]`` bool: position t predicts a trained (response) token ``t + 1``."""
    return (rows["loss_mask"][:, 1:] > 0) & (rows["attention_mask"][:, 1:] > 0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@dataclasses.dataclass
class QuestionStats:
    """Teacher-forced statistics of one student on the evaluation rows: per-question sums over response
    tokens, and the per-token top-1 confidence/correctness with each token's question index (for ECE)."""

    nll_sum: np.ndarray  # [Q]
    kl_sum: np.ndarray  # [Q] KL(teacher‖student) summed over the question's response tokens
    agree_sum: np.ndarray  # [Q] tokens where argmax student == argmax teacher
    tokens: np.ndarray  # [Q] response tokens
    confidence: np.ndarray  # [M] top-1 probability per response token
    correct: np.ndarray  # [M] 0/1: top-1 == gold token
    question: np.ndarray  # [M] question index of each token
    fact_correct_sum: np.ndarray | None = None  # [Q] count tokens (after "has") where top-1 == gold count
    fact_tokens: np.ndarray | None = None  # [Q] count tokens


def teacher_forced_stats(student_logits: np.ndarray, teacher_logits: np.ndarray,
                         rows: dict[str, np.ndarray], fact_token_id: int | None = None) -> QuestionStats:
    """Per-question NLL / KL(t‖s) / agreement sums and per-token calibration data, from next-token logits
    ``[Q, T-1, V]`` of the student and the teacher on the same evaluation ``rows`` (float64 softmaxes).

    ``fact_token_id`` (the id of ``"has"``): also the teacher-forced *fact recall*, top-1 accuracy at the
    response tokens that follow it -- the coin counts, i.e. the knowledge itself, read in the evaluation's
    phrasing with the gold names given (free of the name-copying errors that greedy generation adds)."""
    mask = response_mask(rows)
    labels = rows["input_ids"][:, 1:]
    ls = _log_softmax(student_logits)
    lt = _log_softmax(teacher_logits)
    nll = -np.take_along_axis(ls, labels[..., None], -1)[..., 0]
    kl = np.sum(np.exp(lt) * (lt - ls), -1)
    s_top, t_top = ls.argmax(-1), lt.argmax(-1)
    m = mask.astype(np.float64)
    q_idx = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)
    fact_sum = fact_tok = None
    if fact_token_id is not None:
        fm = (mask & (rows["input_ids"][:, :-1] == fact_token_id)).astype(np.float64)
        fact_sum, fact_tok = ((s_top == labels) * fm).sum(1), fm.sum(1)
    return QuestionStats(nll_sum=(nll * m).sum(1), kl_sum=(kl * m).sum(1), agree_sum=((s_top == t_top) * m).sum(1),
                         tokens=m.sum(1), confidence=np.exp(ls.max(-1))[mask],
                         correct=(s_top == labels)[mask].astype(np.float64), question=q_idx[mask],
                         fact_correct_sum=fact_sum, fact_tokens=fact_tok)


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # proxytune_jax.eval.calibration's convention: (lo, hi] bins, confidence 0 in bin 0.
    return np.clip(np.ceil(np.clip(conf, 0, 1) * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def seed_metrics(stats: QuestionStats, correct_answers: Sequence[bool]) -> dict[str, float]:
    """One student's scores: accuracy, NLL/token, ECE (10 bins), agreement, KL(t‖s)/token."""
    from proxytune_jax.eval import expected_calibration_error

    tok = stats.tokens.sum()
    return {"accuracy": float(np.mean(np.asarray(correct_answers, np.float64))),
            "nll": float(stats.nll_sum.sum() / tok),
            "ece": float(expected_calibration_error(stats.confidence, stats.correct, ECE_BINS)),
            "agreement": float(stats.agree_sum.sum() / tok),
            "kl_teacher_student": float(stats.kl_sum.sum() / tok),
            "fact_recall": (float(stats.fact_correct_sum.sum() / stats.fact_tokens.sum())
                            if stats.fact_tokens is not None else float("nan"))}


METRICS = ("accuracy", "nll", "ece", "agreement", "kl_teacher_student", "fact_recall")


def bootstrap_counts(n_questions: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``[n_boot, Q]`` multiplicities of each question in each resample (share them across methods for
    paired intervals)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_questions, np.full(n_questions, 1.0 / n_questions), size=n_boot).astype(np.float64)


def bootstrap_samples(per_seed: Sequence[QuestionStats], per_seed_correct: Sequence[Sequence[bool]],
                      counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric on each resample of the questions (``counts`` from ``bootstrap_counts``), seeds pooled
    per question: ``{metric: [n_boot]}``."""
    q = len(per_seed[0].tokens)
    acc_q = np.mean([np.asarray(c, np.float64) for c in per_seed_correct], axis=0)  # [Q] mean over seeds
    tok = sum(s.tokens for s in per_seed)
    out = {"accuracy": counts @ acc_q / q}
    for name, field in (("nll", "nll_sum"), ("agreement", "agree_sum"), ("kl_teacher_student", "kl_sum")):
        out[name] = (counts @ sum(getattr(s, field) for s in per_seed)) / (counts @ tok)
    if per_seed[0].fact_tokens is not None:
        out["fact_recall"] = ((counts @ sum(s.fact_correct_sum for s in per_seed))
                              / (counts @ sum(s.fact_tokens for s in per_seed)))
    else:
        out["fact_recall"] = np.full(len(counts), np.nan)
    # ECE on resampled tokens: per-question bin sums, then |Σ correct − Σ conf| per bin over all tokens.
    n_c, s_conf, s_corr = (np.zeros((q, ECE_BINS)) for _ in range(3))
    for s in per_seed:
        b = _bin_index(s.confidence, ECE_BINS)
        np.add.at(n_c, (s.question, b), 1.0)
        np.add.at(s_conf, (s.question, b), s.confidence)
        np.add.at(s_corr, (s.question, b), s.correct)
    out["ece"] = np.abs(counts @ s_corr - counts @ s_conf).sum(1) / (counts @ n_c).sum(1)
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarize(per_seed: Sequence[QuestionStats], per_seed_correct: Sequence[Sequence[bool]],
              counts: np.ndarray) -> dict[str, dict]:
    """``{metric: {"mean", "std", "per_seed", "ci95"}}``: mean ± std (ddof 1) over seeds and the pooled
    bootstrap 95% interval over questions."""
    per = [seed_metrics(s, c) for s, c in zip(per_seed, per_seed_correct)]
    boots = bootstrap_samples(per_seed, per_seed_correct, counts)
    out = {}
    for k in METRICS:
        v = np.array([p[k] for p in per])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "per_seed": [float(x) for x in v], "ci95": interval(boots[k])}
    return out


def paired_difference(a: tuple, b: tuple, counts: np.ndarray) -> dict[str, dict]:
    """Method a − method b per metric on the same question resamples; ``a``/``b`` are
    ``(per_seed_stats, per_seed_correct)``. ``{metric: {"diff", "ci95"}}`` (diff = pooled point estimate)."""
    full = np.ones((1, counts.shape[1]))
    sa, sb = bootstrap_samples(*a, counts), bootstrap_samples(*b, counts)
    pa, pb = bootstrap_samples(*a, full), bootstrap_samples(*b, full)
    return {k: {"diff": float(pa[k][0] - pb[k][0]), "ci95": interval(sa[k] - sb[k])} for k in METRICS}
