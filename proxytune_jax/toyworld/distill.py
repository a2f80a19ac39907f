"""Distilling a tiny student from the toy world's tuned-large teacher with the library's losses
(``proxytune_jax.losses``) and train step, against plain SFT.

Setting. Student = base-small (pretrained on the raw corpus); teacher = tuned-large. Every method trains on
the same sequences (the instruction set: chat prompt + gold worked answer) for the same number of steps;
only the objective differs. The teacher is run **once** over the training set and its outputs are stored
with the batch (offline distillation: full logits for the KL family and SinKD, top-5 ids + log-probs for
FIRST, an n-gram prior and proxy samples for the Bayesian objective), so the train step never runs the
teacher.

Objectives (mean over response tokens; temperature 1 everywhere unless stated):

- ``sft``: cross-entropy on the gold tokens.
- ``forward_kl`` ``KL(p‖q)``, ``reverse_kl`` ``KL(q‖p)``, ``js`` (JS divergence), ``tvd`` (total variation),
  ``generalized_jsd`` (β = 0.5): the pure divergence, no CE term.
- ``sinkd``: the paper's combined objective ``α·FKL + (1−α)·CE + β·SinKD`` with α = 0.5, β = 0.8 and the
  released-code SinKD term (τ 2, ε 0.1, 20 iterations, w = 0.0008, the generative-task weight).
- ``first_top5``: FIRST, ``KL(t‖s)`` against the teacher's top-5 (renormalize mode) with the teacher
  temperature τ fitted by ``fit_temperature`` on held-out sequences (the τ is reported).
- ``bayesian``: ``CE + α·KL(p̂‖q) + β·KL(E(P|M)‖q)`` (α = β = 0.5), prior p̂ from a 2-gram model of the
  teacher's greedy answers to the training prompts (γ = 2), posterior from K = 8 samples per position of a
  proxy model (tuned-small) — the teacher's logits are never used, as for a closed-source teacher; its CE
  targets are the teacher's generated answers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxytune_jax.errors import UserError

METHODS = ("sft", "forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd", "first_top5", "bayesian")
LABELS = {
    "sft": "SFT (no teacher)", "forward_kl": "forward KL", "reverse_kl": "reverse KL", "js": "JS",
    "tvd": "TVD", "generalized_jsd": "generalized JSD (β=0.5)", "sinkd": "SinKD (+FKL+CE)",
    "first_top5": "FIRST top-5", "bayesian": "Bayesian KD",
}
TOPK = 5


def _student_logits(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["input_ids"], batch["attention_mask"])
    return logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]


def _mask(batch):
    m = batch["loss_mask"][:, 1:] > 0
    return m & (batch["attention_mask"][:, 1:] > 0)


def objective(method: str, graphdef, *, first_temperature: float = 1.0) -> Callable:
    """``loss_fn(params, frozen, batch, rng, extras) -> (loss, metrics)`` for the library's train step."""
    from proxytune_jax import losses
    from proxytune_jax.training.objectives import token_cross_entropy

    if method not in METHODS:
        raise UserError(f"unknown distillation method {method!r}; one of {METHODS}")

    def loss_fn(params, frozen, batch, rng, extras):
        del frozen, rng, extras
        s = _student_logits(graphdef, params, batch)
        m = _mask(batch)
        labels = batch["input_ids"][:, 1:]
        ce = token_cross_entropy(s, labels, m)
        if method == "sft":
            loss = ce
        elif method == "first_top5":
            teacher = losses.TopKTeacher(batch["topk_ids"], batch["topk_logp"])
            loss = losses.topk_kl(s, teacher, m, temperature=first_temperature, mode="renormalize")
        elif method == "bayesian":
            prior = losses.SparseDist(batch["prior_ids"], batch["prior_probs"])
            post = losses.SparseDist(batch["post_ids"], batch["post_probs"])
            loss = losses.bayesian_kd(s, labels, prior, post, m, alpha=0.5, beta=0.5)
        else:
            t = batch["teacher_logits"].astype(jnp.float32)
            if method == "forward_kl":
                loss = losses.forward_kl(s, t, m)
            elif method == "reverse_kl":
                loss = losses.reverse_kl(s, t, m)
            elif method == "js":
                loss = losses.js_divergence(s, t, m)
            elif method == "tvd":
                loss = losses.tv_distance(s, t, m)
            elif method == "generalized_jsd":
                loss = losses.generalized_jsd(s, t, m, beta=0.5)
            else:  # sinkd
                loss = 0.5 * losses.forward_kl(s, t, m) + 0.5 * ce + 0.8 * losses.sinkd(s, t, m, weight=0.0008)
        return loss, {"loss": loss, "ce": ce, "tokens": jnp.sum(m, dtype=jnp.int32)}

    return loss_fn


@functools.partial(jax.jit, static_argnums=0)
def _logits_jit(graphdef, params, ids, attn):
    return _student_logits(graphdef, params, {"input_ids": ids, "attention_mask": attn})


def model_logits(model, data: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Next-token logits ``[N, T-1, V]`` (float32, NumPy) of ``model`` over a dataset (the last chunk is
    padded to ``batch_size`` rows so every chunk reuses one compiled program)."""
    graphdef, params = nnx.split(model)
    n = len(data["input_ids"])
    out = []
    for i in range(0, n, batch_size):
        ids, attn = data["input_ids"][i:i + batch_size], data["attention_mask"][i:i + batch_size]
        k = len(ids)
        if k < batch_size and n > batch_size:
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - k, 0)])
            attn = np.concatenate([attn, np.repeat(attn[-1:], batch_size - k, 0)])
        out.append(np.asarray(_logits_jit(graphdef, params, jnp.asarray(ids), jnp.asarray(attn)))[:k])
    return np.concatenate(out)


@dataclasses.dataclass
class TeacherSignals:
    """Everything the objectives read besides the tokens, aligned with the training rows."""

    teacher_logits: np.ndarray  # [N, T-1, V] float16
    topk_ids: np.ndarray  # [N, T-1, k] int32
    topk_logp: np.ndarray  # [N, T-1, k] float32
    first_temperature: float


def teacher_signals(teacher, train: dict[str, np.ndarray], heldout: dict[str, np.ndarray]) -> TeacherSignals:
    """Run the teacher once over the training rows; fit FIRST's teacher temperature on held-out rows."""
    from proxytune_jax import losses

    logits = model_logits(teacher, train)
    top = losses.topk_from_logits(jnp.asarray(logits), k=TOPK)
    held_logits = model_logits(teacher, heldout)
    held_top = losses.topk_from_logits(jnp.asarray(held_logits), k=TOPK)
    mask = (heldout["loss_mask"][:, 1:] > 0)
    tau = losses.fit_temperature(held_top, jnp.asarray(heldout["input_ids"][:, 1:]), jnp.asarray(mask),
                                 mode="renormalize")
    return TeacherSignals(logits.astype(np.float16), np.asarray(top.ids), np.asarray(top.logp), float(tau))


def bayesian_signals(teacher_rows: dict[str, np.ndarray], proxy, *, seed: int = 0, n: int = 2, gamma: float = 2.0,
                     num_samples: int = 8, support: int = 16) -> dict[str, np.ndarray]:
    """Prior (2-gram model of the teacher-generated rows) and posterior (proxy samples) per position of
    ``teacher_rows`` (chat prompt + teacher answer), aligned with the student's ``[N, T-1]`` positions."""
    from proxytune_jax import losses

    ids, attn = teacher_rows["input_ids"], teacher_rows["attention_mask"]
    seqs = [row[a > 0] for row, a in zip(ids, attn)]
    ngram = losses.NgramPrior.from_corpus(seqs, n=n)
    # Priors are computed on the unpadded rows (contexts must not contain padding), then re-left-padded.
    n_rows, width = ids.shape
    prior_ids = np.full((n_rows, width, support + 1), -1, np.int32)
    prior_probs = np.zeros((n_rows, width, support + 1), np.float32)
    for r, seq in enumerate(seqs):
        p = ngram.prior(seq[None, :], gamma=gamma, support=support)
        prior_ids[r, width - len(seq):] = p.ids[0]
        prior_probs[r, width - len(seq):] = p.probs[0]
    prior_ids, prior_probs = prior_ids[:, 1:], prior_probs[:, 1:]  # entry t+1 is predicted at position t
    proxy_logits = model_logits(proxy, teacher_rows)
    samples = np.asarray(losses.sample_proxy_tokens(jax.random.PRNGKey(seed), jnp.asarray(proxy_logits),
                                                    num_samples))
    post = jax.jit(losses.posterior_estimate)(losses.SparseDist(jnp.asarray(prior_ids), jnp.asarray(prior_probs)),
                                              jnp.asarray(samples))
    mask = teacher_rows["loss_mask"][:, 1:] > 0
    keep = lambda x, fill: np.where(mask[..., None], np.asarray(x), fill)  # noqa: E731
    return {"prior_ids": keep(prior_ids, -1).astype(np.int32), "prior_probs": keep(prior_probs, 0.0).astype(np.float32),
            "post_ids": keep(post.ids, -1).astype(np.int32), "post_probs": keep(post.probs, 0.0).astype(np.float32)}


@dataclasses.dataclass
class StudentScores:
    accuracy: float  # GSM-style exact match of greedy answers to held-out questions
    nll: float  # mean NLL per response token of the gold held-out answers
    ece10: float  # token-level ECE of top-1 predictions on the gold held-out answers, 10 bins
    ece15: float
    confidences: np.ndarray  # for reliability diagrams
    correct: np.ndarray


def score_student(model, tokenizer, questions, heldout_rows: dict[str, np.ndarray]) -> StudentScores:
    """Accuracy by greedy generation (chat prompt) and NLL/ECE by teacher forcing the gold answers."""
    from proxytune_jax.eval import expected_calibration_error, top1_confidence_and_correct
    from proxytune_jax.toyworld.evaluate import generate

    acc = generate([model], tokenizer, questions, chat=[True]).accuracy
    logits = model_logits(model, heldout_rows)
    labels = heldout_rows["input_ids"][:, 1:]
    mask = heldout_rows["loss_mask"][:, 1:] > 0
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    nll_tok = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    nll = float(nll_tok[mask].mean())
    conf, corr = top1_confidence_and_correct(logits, labels, mask)
    return StudentScores(acc, nll, expected_calibration_error(conf, corr, 10),
                         expected_calibration_error(conf, corr, 15), conf, corr)


def distill_students(student_init, teacher, proxy, tokenizer, train_questions, heldout_questions, *,
                     methods=METHODS, seeds=(0, 1, 2), fit_config=None, progress: bool = True, log=print):
    """Train one student per (method, seed) and score it. Returns ``(scores[method][seed], info)``."""
    from proxytune_jax.toyworld.data import encode_instructions
    from proxytune_jax.toyworld.evaluate import generate
    from proxytune_jax.toyworld.train import FitConfig, fit
    from proxytune_jax.training.state import split_params

    fit_config = fit_config or FitConfig(steps=200, batch_size=32, learning_rate=1e-3, warmup_steps=10)
    train = encode_instructions(tokenizer, train_questions)
    heldout = encode_instructions(tokenizer, heldout_questions)
    info: dict = {}
    data = dict(train)
    if any(m in methods for m in ("forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd", "first_top5")):
        sig = teacher_signals(teacher, train, heldout)
        data.update(teacher_logits=sig.teacher_logits, topk_ids=sig.topk_ids, topk_logp=sig.topk_logp)
        info["first_teacher_temperature"] = sig.first_temperature
    bayes_data = None
    if "bayesian" in methods:
        # The closed-source teacher only gives text: its greedy answers to the training prompts.
        answers = generate([teacher], tokenizer, train_questions, chat=[True]).completions
        rows = encode_instructions(tokenizer, train_questions, responses=answers)
        bayes_data = dict(rows)
        bayes_data.update(bayesian_signals(rows, proxy, seed=0))
    graphdef, _ = split_params(student_init)
    step_cache: dict = {}  # one compiled train step per method, shared by its seeds
    scores: dict[str, dict[int, StudentScores]] = {}
    for method in methods:
        tau = info["first_teacher_temperature"] if method == "first_top5" else 1.0
        loss_fn = objective(method, graphdef, first_temperature=tau)
        rows = bayes_data if method == "bayesian" else _select(data, method)
        scores[method] = {}
        for seed in seeds:
            cfg = dataclasses.replace(fit_config, seed=seed)
            student, _ = fit(student_init, rows, loss_fn, cfg, desc=f"distill {method} seed {seed}",
                             progress=progress, step_cache=step_cache)
            scores[method][seed] = score_student(student, tokenizer, heldout_questions, heldout)
    return scores, info


def _select(data: dict, method: str) -> dict:
    keep = {"input_ids", "attention_mask", "loss_mask"}
    if method in ("forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd"):
        keep |= {"teacher_logits"}
    if method == "first_top5":
        keep |= {"topk_ids", "topk_logp"}
    return {k: v for k, v in data.items() if k in keep}
