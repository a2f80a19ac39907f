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
  ``generalized_jsd`` (β = 0.1, GKD's setting near forward KL; β = 0.5 would repeat the JS row): the pure
  divergence, no CE term.
- ``sinkd``: the paper's combined objective ``α·FKL + (1−α)·CE + β·SinKD`` with α = 0.5, β = 0.8 and the
  released-code SinKD term (τ 2, ε 0.1, 20 iterations, w = 0.0008, the generative-task weight). The SinKD
  term is batch-wise (an N×N cost over the batch's positions, N²·V work), so it is computed over the first
  ``SINKD_ROWS`` rows of each (shuffled) batch; FKL and CE use the whole batch.
- ``first_top5``: FIRST, ``KL(t‖s)`` against the teacher's top-5 (renormalize mode, the paper's) with the
  teacher temperature τ fitted by ``fit_temperature`` on held-out sequences (the τ is reported).
  Renormalizing on both sides makes the loss blind to how much mass the student keeps *outside* the
  teacher's top-5 (its gradient there is zero): a student starting from a raw-text base keeps putting mass on
  raw-text continuations the teacher rules out (in a design run: 0.64 of its mass on the teacher's top-5
  after training vs 0.89 for SFT/forward KL), which costs NLL, calibration and greedy accuracy. This is a property
  of the objective, not a bug, so the table also has
- ``first_top5_tail``: the same with ``mode="tail_bucket"`` (a (k+1)-th "everything else" bucket on both
  sides, methods.md §2), τ fitted in that mode.
- ``bayesian``: ``CE + α·KL(p̂‖q) + β·KL(E(P|M)‖q)`` (α = β = 0.5), prior p̂ from a 2-gram model of the
  teacher's greedy answers to the training prompts (γ = 2), posterior from K = 8 samples per position of a
  proxy model (tuned-small) — the teacher's logits are never used, as for a closed-source teacher; its CE
  targets are the teacher's generated answers.

Cost. The students of one method are trained together: their parameters are stacked on a leading seed axis
and one jitted ``lax.scan`` over steps runs ``jax.vmap`` of the (loss, gradient, AdamW update) over the seeds,
each seed with its own data order (``train_students``). The optimizer is the library's
(``training.optim.make_optimizer``); under ``vmap`` its global-norm clipping stays per seed. The finished
table (scores and the arrays behind the reliability diagram) is cached by a digest of everything it
depends on (``distill_cached``), written last, so an interrupted run is redone.
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
from proxytune_jax.toyworld.train import batch_orders

METHODS = ("sft", "forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd", "first_top5", "first_top5_tail",
           "bayesian")
LABELS = {
    "sft": "SFT (no teacher)", "forward_kl": "forward KL", "reverse_kl": "reverse KL", "js": "JS",
    "tvd": "TVD", "generalized_jsd": "generalized JSD (β=0.1)", "sinkd": "SinKD (+FKL+CE)",
    "first_top5": "FIRST top-5", "first_top5_tail": "FIRST top-5 + tail bucket", "bayesian": "Bayesian KD",
}
TOPK = 5
SINKD_ROWS = 8  # rows of each batch entering the batch-wise SinKD term
DISTILL_VERSION = 2  # bump when the procedure changes (invalidates cached tables)


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
        elif method in ("first_top5", "first_top5_tail"):
            teacher = losses.TopKTeacher(batch["topk_ids"], batch["topk_logp"])
            mode = "renormalize" if method == "first_top5" else "tail_bucket"
            loss = losses.topk_kl(s, teacher, m, temperature=first_temperature, mode=mode)
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
                loss = losses.generalized_jsd(s, t, m, beta=0.1)
            else:  # sinkd
                r = SINKD_ROWS
                loss = (0.5 * losses.forward_kl(s, t, m) + 0.5 * ce
                        + 0.8 * losses.sinkd(s[:r], t[:r], m[:r], weight=0.0008))
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
    first_temperature: float  # fitted for the renormalize mode
    first_tail_temperature: float  # fitted for the tail_bucket mode


def teacher_signals(teacher, train: dict[str, np.ndarray], heldout: dict[str, np.ndarray]) -> TeacherSignals:
    """Run the teacher once over the training rows; fit FIRST's teacher temperature on held-out rows."""
    from proxytune_jax import losses

    logits = model_logits(teacher, train)
    top = losses.topk_from_logits(jnp.asarray(logits), k=TOPK)
    held_logits = model_logits(teacher, heldout)
    held_top = losses.topk_from_logits(jnp.asarray(held_logits), k=TOPK)
    mask = (heldout["loss_mask"][:, 1:] > 0)
    targets, mask = jnp.asarray(heldout["input_ids"][:, 1:]), jnp.asarray(mask)
    tau = losses.fit_temperature(held_top, targets, mask, mode="renormalize")
    tau_tail = losses.fit_temperature(held_top, targets, mask, mode="tail_bucket", vocab_size=logits.shape[-1])
    return TeacherSignals(logits.astype(np.float16), np.asarray(top.ids), np.asarray(top.logp), float(tau),
                          float(tau_tail))


def bayesian_signals(teacher_rows: dict[str, np.ndarray], proxy, *, seed: int = 0, n: int = 2, gamma: float = 2.0,
                     num_samples: int = 8, support: int = 8, num_bins: int = 32) -> dict[str, np.ndarray]:
    """Prior (2-gram model of the teacher-generated rows) and posterior (proxy samples) per position of
    ``teacher_rows`` (chat prompt + teacher answer), aligned with the student's ``[N, T-1]`` positions.
    The posterior (``num_bins`` grid values m) is computed at the trained (response) positions only; the
    toy world's answers have at most a handful of plausible next tokens, hence the small support and grid."""
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
    mask = teacher_rows["loss_mask"][:, 1:] > 0
    post = jax.jit(functools.partial(losses.posterior_estimate, num_bins=num_bins))(
        losses.SparseDist(jnp.asarray(prior_ids[mask]), jnp.asarray(prior_probs[mask])), jnp.asarray(samples[mask]))
    post_ids = np.full(mask.shape + (support + 1 + num_samples,), -1, np.int32)
    post_probs = np.zeros(mask.shape + (support + 1 + num_samples,), np.float32)
    post_ids[mask], post_probs[mask] = np.asarray(post.ids), np.asarray(post.probs)
    keep = lambda x, fill: np.where(mask[..., None], np.asarray(x), fill)  # noqa: E731
    return {"prior_ids": keep(prior_ids, -1).astype(np.int32), "prior_probs": keep(prior_probs, 0.0).astype(np.float32),
            "post_ids": post_ids, "post_probs": post_probs}


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


def _make_chunk_runner(loss_fn: Callable, optimizer):
    """``run(params, opt_state, data, idx [steps, S, B]) -> (params, opt_state, losses [steps, S])``: a scan over
    steps of the vmapped (over the seed axis S) gradient step; rows are gathered from ``data`` inside."""
    import optax

    def one_seed(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, None, batch, None, {})
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stepped = jax.vmap(one_seed)

    def run(params, opt_state, data, idx):
        def body(carry, rows):  # rows [S, B]
            p, o = carry
            batch = jax.tree.map(lambda x: x[rows], data)  # [S, B, ...]
            p, o, loss = stepped(p, o, batch)
            return (p, o), loss
        (params, opt_state), losses_ = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state, losses_

    return jax.jit(run, donate_argnums=(0, 1))


def train_students(student_init, data: dict[str, np.ndarray], loss_fn: Callable, config, seeds, *,
                   chunk: int = 25, desc: str = "distill", progress: bool = True):
    """Train ``len(seeds)`` copies of ``student_init`` on ``data`` at once (stacked params, ``vmap`` over
    seeds; seed ``s`` draws its batches with ``batch_orders(..., seed=s)``). ``config`` is a
    ``toyworld.train.FitConfig`` (its ``seed`` is ignored). Returns ``(graphdef, stacked params, losses
    [steps, S])``."""
    from tqdm.auto import tqdm

    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import split_params

    graphdef, params = split_params(student_init)
    optimizer = make_optimizer(OptimConfig(
        learning_rate=config.learning_rate, warmup_steps=min(config.warmup_steps, max(config.steps - 1, 0)),
        total_steps=config.steps, weight_decay=config.weight_decay, min_lr_ratio=0.1))
    params = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * len(seeds)), params)
    opt_state = jax.vmap(optimizer.init)(params)
    n = len(data["input_ids"])
    idx = np.stack([batch_orders(n, config.steps, config.batch_size, s) for s in seeds], axis=1)  # [steps, S, B]
    run = _make_chunk_runner(loss_fn, optimizer)
    dev = {k: jnp.asarray(v) for k, v in data.items()}
    out = []
    with tqdm(total=config.steps, desc=desc, disable=not progress, leave=False, mininterval=0.5) as bar:
        for start in range(0, config.steps, chunk):
            part = idx[start:start + chunk]
            params, opt_state, ls = run(params, opt_state, dev, jnp.asarray(part))
            out.append(ls)
            bar.update(len(part))
    return graphdef, params, np.concatenate([np.asarray(x) for x in out])


def unstack(graphdef, stacked, i: int):
    """Model ``i`` of a stack built by ``train_students``."""
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], stacked))


def distill_students(student_init, teacher, proxy, tokenizer, train_questions, heldout_questions, *,
                     methods=METHODS, seeds=(0, 1, 2), fit_config=None, progress: bool = True, log=print):
    """Train one student per (method, seed) and score it. Returns ``(scores[method][seed], info)``."""
    from proxytune_jax.toyworld.data import encode_instructions
    from proxytune_jax.toyworld.evaluate import generate
    from proxytune_jax.toyworld.train import FitConfig

    fit_config = fit_config or FitConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10)
    seeds = tuple(seeds)
    train = encode_instructions(tokenizer, train_questions)
    heldout = encode_instructions(tokenizer, heldout_questions)
    import time

    info: dict = {"seconds": {}}
    t0 = time.perf_counter()
    data = dict(train)
    if any(m in methods for m in ("forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd", "first_top5",
                                  "first_top5_tail")):
        sig = teacher_signals(teacher, train, heldout)
        data.update(teacher_logits=sig.teacher_logits, topk_ids=sig.topk_ids, topk_logp=sig.topk_logp)
        info["first_teacher_temperature"] = sig.first_temperature
        info["first_tail_teacher_temperature"] = sig.first_tail_temperature
    bayes_data = None
    if "bayesian" in methods:
        # The closed-source teacher only gives text: its greedy answers to the training prompts.
        answers = generate([teacher], tokenizer, train_questions, chat=[True]).completions
        rows = encode_instructions(tokenizer, train_questions, responses=answers)
        bayes_data = dict(rows)
        bayes_data.update(bayesian_signals(rows, proxy, seed=0))
    info["seconds"]["teacher_signals"] = time.perf_counter() - t0
    graphdef0 = nnx.split(student_init)[0]
    scores: dict[str, dict[int, StudentScores]] = {}
    for method in methods:
        tau = {"first_top5": info.get("first_teacher_temperature"),
               "first_top5_tail": info.get("first_tail_teacher_temperature")}.get(method) or 1.0
        loss_fn = objective(method, graphdef0, first_temperature=tau)
        rows = bayes_data if method == "bayesian" else _select(data, method)
        t = time.perf_counter()
        graphdef, stacked, _ = train_students(student_init, rows, loss_fn, fit_config, seeds,
                                              desc=f"distill {method} ({len(seeds)} seeds)", progress=progress)
        t1 = time.perf_counter()
        scores[method] = {s: score_student(unstack(graphdef, stacked, i), tokenizer, heldout_questions, heldout)
                          for i, s in enumerate(seeds)}
        info["seconds"][method] = {"train": t1 - t, "score": time.perf_counter() - t1}
    return scores, info


def distill_digest(toyworld_digest: str, methods, seeds, fit_config) -> str:
    """Cache key of a distillation table: the toy world, the methods, seeds and student training config."""
    import hashlib
    import json

    blob = json.dumps({"version": DISTILL_VERSION, "toyworld": toyworld_digest, "methods": list(methods),
                       "seeds": list(seeds), "fit": dataclasses.asdict(fit_config), "topk": TOPK,
                       "sinkd_rows": SINKD_ROWS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def distill_cached(cache_root, toyworld_digest: str, *args, methods=METHODS, seeds=(0, 1, 2), fit_config=None,
                   **kwargs):
    """``distill_students`` with its results cached under ``<cache_root>/distill/<digest>/`` (``scores.npz`` then
    ``manifest.json``, written last: a folder without the manifest is an interrupted run and is redone).
    Returns ``(scores, info)`` with ``info["cached"]``."""
    import json
    import shutil
    from pathlib import Path

    from proxytune_jax.toyworld.train import FitConfig

    fit_config = fit_config or FitConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10)
    seeds = tuple(seeds)
    root = Path(cache_root) / "distill" / distill_digest(toyworld_digest, methods, seeds, fit_config)
    manifest = root / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        arrays = np.load(root / "scores.npz")
        scores = {m: {s: StudentScores(**meta["scores"][m][str(s)], confidences=arrays[f"{m}/{s}/conf"],
                                       correct=arrays[f"{m}/{s}/correct"]) for s in seeds} for m in methods}
        return scores, {**meta["info"], "cached": True}
    if root.exists():
        shutil.rmtree(root)
    scores, info = distill_students(*args, methods=methods, seeds=seeds, fit_config=fit_config, **kwargs)
    root.mkdir(parents=True)
    np.savez(root / "scores.npz", **{f"{m}/{s}/{k}": getattr(scores[m][s], a) for m in methods for s in seeds
                                     for k, a in (("conf", "confidences"), ("correct", "correct"))})
    meta = {"info": info, "scores": {m: {str(s): {k: float(getattr(scores[m][s], k))
                                                  for k in ("accuracy", "nll", "ece10", "ece15")}
                                         for s in seeds} for m in methods}}
    manifest.write_text(json.dumps(meta, indent=2) + "\n")
    return scores, {**info, "cached": False}


def _select(data: dict, method: str) -> dict:
    keep = {"input_ids", "attention_mask", "loss_mask"}
    if method in ("forward_kl", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd"):
        keep |= {"teacher_logits"}
    if method in ("first_top5", "first_top5_tail"):
        keep |= {"topk_ids", "topk_logp"}
    return {k: v for k, v in data.items() if k in keep}
