"""The toy world's distillation table: every method on the transfer-set regime (``toyworld.transfer``), each
trained by the library's trainer (``training.fit``) with an objective of the registry, several seeds at once.

Student = base-small, teacher = tuned-large. Every method except ``sft_gold`` trains on the same rows (gold
rows + transfer prompts answered by the teacher, flagged ``ce_rows`` / ``kd_rows``) for the same steps:
``CE(gold rows) + D(transfer rows)``, each a mean over its own tokens, and only ``D`` differs:

================= ============================================================================================
method            objective (``training.objectives``) and its transfer-set term ``D``
================= ============================================================================================
``sft_gold``      ``SFT``: the gold rows only (no teacher)
``seq_kd``        ``OfflineLogits(loss="cross_entropy")``: CE on the teacher's answers (sequence-level KD)
``word_kd``       ``OfflineLogits(loss="forward_kl")``: KL(p‖q) to the teacher's logits (word-level KD)
``reverse_kl``    KL(q‖p);  ``js``: JS divergence;  ``tvd``: total variation;
``generalized_jsd`` β = 0.1 (GKD's setting near forward KL)
``sinkd``         SinKD's combined objective ``0.5·FKL + 0.5·CE + 0.8·SinKD`` (SinKD term: τ 2, ε 0.1,
                  20 iterations, w = 0.0008, on the first ``SINKD_ROWS`` rows of a batch: N²·V work)
``first_top5``    ``OfflineTopK``: KL against the teacher's top-5 (renormalize mode), teacher temperature τ
                  fitted on the dev questions (``losses.fit_temperature``); ``first_top5_tau1``: τ = 1
``bayesian``      ``Bayesian``: CE + α·KL(prior‖q) + β·KL(posterior‖q), α = β = 0.5: a 2-gram prior of the
                  teacher's answers, posterior from 8 samples per position of tuned-small, drawn once
                  (the teacher's logits never used, as for a closed-source teacher)
================= ============================================================================================

Beyond the demo's table (``EXTRA_METHODS``; ``experiments/toyworld_gkd.py`` runs them): GKD's grid on the same
rows, the divergence fixed to forward KL so that only the outputs differ -- ``word_kd`` is its supervised KD
(λ = 0: the teacher's fixed answers), ``seq_kd`` its sequence-level KD, ``gkd_mixed`` λ = 0.5 and
``gkd_on_policy`` λ = 1 (``OnPolicyDistillation``: the transfer rows' answers sampled from the student inside
the step at temperature 1, scored by the teacher in the step); ``gkd_on_policy_jsd`` λ = 1 with GKD's
generalized JSD (β = 0.5); and ``taid`` (``TAID`` with the released defaults on the teacher's logits).

The primary comparison, declared before any run, is ``transfer.PRIMARY_COMPARISON`` (word-level KD vs SFT
on gold); ``seq_kd`` separates "more data" (the teacher's answers) from "the loss" (its distribution).
The finished table is cached by a digest of everything it depends on (``distill_cached``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxytune_jax.toyworld import transfer as T
from proxytune_jax.toyworld.train import FitConfig, train_models

GKD_NEW_TOKENS = 16  # the answers are "<name> has <n> coins ... #### <n>" + <eos>: under 16 tokens
METHODS = ("sft_gold", "seq_kd", "word_kd", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd", "first_top5",
           "first_top5_tau1", "bayesian")
LABELS = {
    "sft_gold": "SFT on gold only", "seq_kd": "sequence-level KD", "word_kd": "word-level KD (forward KL)",
    "reverse_kl": "reverse KL", "js": "JS", "tvd": "TVD", "generalized_jsd": "generalized JSD (β=0.1)",
    "sinkd": "SinKD (+FKL+CE)", "first_top5": "FIRST top-5, fitted τ", "first_top5_tau1": "FIRST top-5, τ = 1",
    "bayesian": "Bayesian KD", "gkd_mixed": "GKD mixed (λ = 0.5, FKL)", "gkd_on_policy": "GKD on-policy (λ = 1, FKL)",
    "gkd_on_policy_jsd": "GKD on-policy (λ = 1, JSD β 0.5)", "taid": "TAID",
}
EXTRA_METHODS = ("gkd_mixed", "gkd_on_policy", "gkd_on_policy_jsd", "taid")
TOPK = 5
SINKD_ROWS = 8
PRIOR_SUPPORT, POSTERIOR_BINS, POSTERIOR_SAMPLES = 8, 32, 8  # Bayesian KD: the answers have few continuations
DISTILL_VERSION = 3  # bump when the procedure changes (invalidates cached tables)
DEFAULT_FIT = FitConfig(steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=10)


def _offline(loss: str, **kw):
    from proxytune_jax.training.objectives import OfflineLogits
    return OfflineLogits(loss=loss, kd_weight=1.0, ce_weight=1.0, **kw)


def _sinkd():
    from proxytune_jax.training.objectives import LossTerm, OfflineLogits
    # 0.5·(FKL + CE + 1.6·SinKD) = 0.5·FKL + 0.5·CE + 0.8·SinKD on the transfer rows, + CE on gold rows
    return OfflineLogits(loss="forward_kl", kd_weight=0.5, ce_weight=1.0, extra_terms=(
        LossTerm("cross_entropy"), LossTerm("sinkd", 1.6, {"weight": 0.0008}, max_rows=SINKD_ROWS)))


def _first(tau: float):
    from proxytune_jax.training.objectives import OfflineTopK
    return OfflineTopK(temperature=tau, mode="renormalize", kd_weight=1.0, ce_weight=1.0)


def _bayesian():
    from proxytune_jax.training.objectives import Bayesian
    return Bayesian(posterior_bins=POSTERIOR_BINS, posterior_samples=POSTERIOR_SAMPLES, alpha=0.5, beta=0.5)


def _gkd(student_fraction: float, loss: str = "forward_kl", **params):
    from proxytune_jax.training.objectives import OnPolicyDistillation
    return OnPolicyDistillation(teacher="tuned-large", loss=loss, loss_params=params, kd_weight=1.0, ce_weight=1.0,
                                student_fraction=student_fraction, max_new_tokens=GKD_NEW_TOKENS, temperature=1.0)


def _taid():
    from proxytune_jax.training.objectives import TAID
    return TAID(kd_weight=1.0, ce_weight=1.0)


def _sft():
    from proxytune_jax.training.objectives import SFT
    return SFT()


# method -> (objective builder taking the fitted FIRST τ, the extra arrays it reads)
METHOD_TABLE: dict[str, tuple[Callable[[float], object], tuple[str, ...]]] = {
    "sft_gold": (lambda tau: _sft(), ()),
    "seq_kd": (lambda tau: _offline("cross_entropy"), ("teacher_logits",)),
    "word_kd": (lambda tau: _offline("forward_kl"), ("teacher_logits",)),
    "reverse_kl": (lambda tau: _offline("reverse_kl"), ("teacher_logits",)),
    "js": (lambda tau: _offline("js_divergence"), ("teacher_logits",)),
    "tvd": (lambda tau: _offline("tv_distance"), ("teacher_logits",)),
    "generalized_jsd": (lambda tau: _offline("generalized_jsd", loss_params={"beta": 0.1}), ("teacher_logits",)),
    "sinkd": (lambda tau: _sinkd(), ("teacher_logits",)),
    "first_top5": (lambda tau: _first(tau), ("topk_ids", "topk_logp")),
    "first_top5_tau1": (lambda tau: _first(1.0), ("topk_ids", "topk_logp")),
    "bayesian": (lambda tau: _bayesian(), ("prior_ids", "prior_probs", "posterior_ids", "posterior_probs")),
    "gkd_mixed": (lambda tau: _gkd(0.5), ()),
    "gkd_on_policy": (lambda tau: _gkd(1.0), ()),
    "gkd_on_policy_jsd": (lambda tau: _gkd(1.0, "generalized_jsd", beta=0.5), ()),
    "taid": (lambda tau: _taid(), ("teacher_logits",)),
}


@functools.partial(jax.jit, static_argnums=0)
def _logits_jit(graphdef, params, ids, attn):
    model = nnx.merge(graphdef, params)
    logits, _ = model(ids, attn)
    return logits[:, :-1].astype(jnp.float32)


def model_logits(model, data: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Next-token logits ``[N, T-1, V]`` (float32, NumPy) of ``model`` over a dataset (the last chunk padded to
    ``batch_size`` rows so every chunk reuses one compiled program)."""
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
class TransferData:
    """The regime's arrays: training rows with every teacher signal, the evaluation rows and the teacher's
    logits on them."""

    splits: T.TransferSplits
    rows: dict[str, np.ndarray]  # gold + transfer rows, ce_rows/kd_rows, teacher_logits, topk_*, prior_*
    eval_rows: dict[str, np.ndarray]
    teacher_eval_logits: np.ndarray
    first_temperature: float
    teacher_label_accuracy: float


def _pad_last_position(x: np.ndarray, fill) -> np.ndarray:
    """``[N, T-1, k]`` (aligned with predictions) -> ``[N, T, k]`` (aligned with input positions, as the batch
    convention of ``offline_topk`` has it): one filler position appended."""
    pad = np.broadcast_to(np.asarray(fill, x.dtype), (x.shape[0], 1) + x.shape[2:])
    return np.concatenate([x, pad], axis=1)


def prepare(world, tokenizer, teacher, config: T.TransferConfig, *, need: set[str], proxy=None) -> TransferData:
    """Split the world, let the teacher label the transfer prompts, and compute the signals ``need`` names
    (``proxy``: the model sampled for the Bayesian posterior)."""
    from proxytune_jax import losses
    from proxytune_jax.eval import extract_answer
    from proxytune_jax.training.objectives import PriorAttacher

    sp = T.make_splits(world, config)
    answers = T.teacher_label(teacher, tokenizer, sp.transfer)
    truth = [world.coins[p] for p in sp.transfer_people]
    label_acc = float(np.mean([extract_answer(a) == str(v) for a, v in zip(answers, truth)]))
    rows = T.encode_rows(tokenizer, sp.gold, sp.transfer, answers)
    is_gold = rows.pop("is_gold")
    rows["ce_rows"], rows["kd_rows"] = is_gold, 1 - is_gold
    tau = 1.0
    if "teacher_logits" in need or "topk_ids" in need:
        logits = model_logits(teacher, rows)
        rows["teacher_logits"] = logits.astype(np.float16)
        top = losses.topk_from_logits(jnp.asarray(logits), k=TOPK)
        rows["topk_ids"] = _pad_last_position(np.asarray(top.ids, np.int32), np.arange(TOPK, dtype=np.int32))
        rows["topk_logp"] = _pad_last_position(np.asarray(top.logp, np.float32), -np.log(TOPK))
        dev = T.encode_rows(tokenizer, sp.dev)
        dtop = losses.topk_from_logits(jnp.asarray(model_logits(teacher, dev)), k=TOPK)
        tau = float(losses.fit_temperature(dtop, jnp.asarray(dev["input_ids"][:, 1:]),
                                           jnp.asarray(T.response_mask(dev)), mode="renormalize"))
    if "prior_ids" in need:  # a 2-gram model of the teacher's text (its answers to the transfer prompts)
        teacher_text = [r[a > 0] for r, a, k in zip(rows["input_ids"], rows["attention_mask"], rows["kd_rows"]) if k]
        prior = losses.NgramPrior.from_corpus(teacher_text, n=2)
        attached = PriorAttacher(prior, gamma=2.0, support=PRIOR_SUPPORT)(rows)
        rows["prior_ids"], rows["prior_probs"] = attached["prior_ids"], attached["prior_probs"]
    if "posterior_ids" in need:  # E(P | M) from K samples of the proxy M per trained position, drawn once
        mask = T.response_mask(rows) & (rows["kd_rows"][:, None] > 0)
        samples = np.asarray(losses.sample_proxy_tokens(jax.random.PRNGKey(0), jnp.asarray(model_logits(proxy, rows)),
                                                        POSTERIOR_SAMPLES))
        prior_next = losses.SparseDist(jnp.asarray(rows["prior_ids"][:, 1:][mask]),
                                       jnp.asarray(rows["prior_probs"][:, 1:][mask]))
        post = jax.jit(functools.partial(losses.posterior_estimate, num_bins=POSTERIOR_BINS))(
            prior_next, jnp.asarray(samples[mask]))
        width = post.ids.shape[-1]
        rows["posterior_ids"] = np.full(mask.shape + (width,), -1, np.int32)
        rows["posterior_probs"] = np.zeros(mask.shape + (width,), np.float32)
        rows["posterior_ids"][mask], rows["posterior_probs"][mask] = np.asarray(post.ids), np.asarray(post.probs)
    eval_rows = T.encode_rows(tokenizer, sp.eval)
    eval_rows.pop("is_gold")
    return TransferData(sp, rows, eval_rows, model_logits(teacher, eval_rows), tau, label_acc)


def _rows_for(method: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    base = ("input_ids", "attention_mask", "loss_mask")
    if method == "sft_gold":
        keep = rows["ce_rows"] > 0
        return {k: rows[k][keep] for k in base}
    return {k: rows[k] for k in base + ("ce_rows", "kd_rows") + METHOD_TABLE[method][1]}


def score(model, tokenizer, data: TransferData, fact_token_id: int) -> tuple[T.QuestionStats, list[bool]]:
    """Teacher-forced statistics on the evaluation rows and greedy exact-match per evaluation question."""
    from proxytune_jax.eval import extract_answer
    from proxytune_jax.toyworld.evaluate import generate

    stats = T.teacher_forced_stats(model_logits(model, data.eval_rows), data.teacher_eval_logits, data.eval_rows,
                                   fact_token_id)
    completions = generate([model], tokenizer, list(data.splits.eval), chat=[True]).completions
    correct = [extract_answer(c) == str(q.target) for c, q in zip(completions, data.splits.eval)]
    return stats, correct


def run_table(student, teacher, proxy, tokenizer, world, *, methods=METHODS, seeds=(0, 1, 2),
              fit_config: FitConfig = DEFAULT_FIT, transfer_config: T.TransferConfig = T.TransferConfig(),
              references: dict | None = None, n_boot: int = 2000, progress: bool = True) -> dict:
    """Train every method's students (all seeds at once per method) and score them. Returns the table: per
    method ``summary`` (mean ± std over seeds, bootstrap 95% interval over questions), the paired differences
    of the declared comparisons, reference models' scores, the teacher's numbers and timings; plus, under
    ``"_arrays"``, each method's pooled token confidences/correctness (for reliability diagrams)."""
    need = {a for m in methods for a in METHOD_TABLE[m][1]}
    t0 = time.perf_counter()
    data = prepare(world, tokenizer, teacher, transfer_config, need=need, proxy=proxy)
    fact_id = tokenizer.convert_tokens_to_ids("▁has")
    counts = T.bootstrap_counts(len(data.splits.eval), n_boot, seed=0)
    out: dict = {"seconds": {"teacher_signals": time.perf_counter() - t0}, "methods": {}, "differences": {},
                 "reference": {}, "_arrays": {}}
    for name, model in {"tuned-large (teacher)": teacher, **(references or {})}.items():
        out["reference"][name] = T.seed_metrics(*score(model, tokenizer, data, fact_id))
    per_method = {}
    for method in methods:
        build, _ = METHOD_TABLE[method]
        objective = build(data.first_temperature)
        frozen = {role: {"proxy": proxy, "teacher": teacher}[role] for role in objective.frozen_models()}
        t1 = time.perf_counter()
        res = train_models(student, _rows_for(method, data.rows), objective, fit_config, seeds=seeds,
                           frozen_models=frozen, desc=f"distill {method} ({len(seeds)} seeds)", progress=progress)
        t2 = time.perf_counter()
        scored = [score(m, tokenizer, data, fact_id) for m in res.models]
        per_method[method] = ([s for s, _ in scored], [c for _, c in scored])
        out["methods"][method] = {"label": LABELS[method], "objective": objective.to_dict(),
                                  **T.summarize(*per_method[method], counts),
                                  "final_loss": [float(x) for x in res.metrics["loss"][:, -1]]}
        out["_arrays"][method] = (np.concatenate([s.confidence for s, _ in scored]),
                                  np.concatenate([s.correct for s, _ in scored]))
        out["seconds"][method] = {"train": t2 - t1, "score": time.perf_counter() - t2}
    for a, b in (T.PRIMARY_COMPARISON,) + tuple(T.SECONDARY_COMPARISONS):
        if a in per_method and b in per_method:
            out["differences"][f"{a} - {b}"] = T.paired_difference(per_method[a], per_method[b], counts)
    out["teacher"] = {"transfer_label_accuracy": data.teacher_label_accuracy,
                      "first_temperature": data.first_temperature, "n_gold": len(data.splits.gold),
                      "n_transfer": len(data.splits.transfer), "n_eval": len(data.splits.eval)}
    return out


def distill_digest(toyworld_digest: str, methods, seeds, fit_config: FitConfig,
                   transfer_config: T.TransferConfig) -> str:
    blob = json.dumps({"version": DISTILL_VERSION, "toyworld": toyworld_digest, "methods": list(methods),
                       "seeds": list(seeds), "fit": dataclasses.asdict(fit_config),
                       "transfer": dataclasses.asdict(transfer_config), "topk": TOPK, "sinkd_rows": SINKD_ROWS,
                       "bayes": [PRIOR_SUPPORT, POSTERIOR_BINS, POSTERIOR_SAMPLES]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def distill_cached(cache_root, toyworld_digest: str, *args, methods=METHODS, seeds=(0, 1, 2),
                   fit_config: FitConfig = DEFAULT_FIT, transfer_config: T.TransferConfig = T.TransferConfig(),
                   **kwargs) -> dict:
    """``run_table`` with its result cached under ``<cache_root>/distill/<digest>/`` (``arrays.npz`` then
    ``table.json``, written last: a folder without it is an interrupted run and is redone). The result has
    ``"cached"``."""
    seeds = tuple(seeds)
    root = Path(cache_root) / "distill" / distill_digest(toyworld_digest, methods, seeds, fit_config,
                                                         transfer_config)
    table_file = root / "table.json"
    if table_file.is_file():
        table = json.loads(table_file.read_text())
        arrays = np.load(root / "arrays.npz")
        table["_arrays"] = {m: (arrays[f"{m}/conf"], arrays[f"{m}/correct"]) for m in methods}
        return {**table, "cached": True}
    if root.exists():
        shutil.rmtree(root)
    table = run_table(*args, methods=methods, seeds=seeds, fit_config=fit_config, transfer_config=transfer_config,
                      **kwargs)
    root.mkdir(parents=True)
    np.savez(root / "arrays.npz", **{f"{m}/{k}": a for m, (conf, cor) in table["_arrays"].items()
                                     for k, a in (("conf", conf), ("correct", cor))})
    tmp = root / "table.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in table.items() if k != "_arrays"}, indent=1) + "\n")
    tmp.replace(table_file)
    return {**table, "cached": False}


def reading(diff: dict, spread: float | None) -> str:
    """One line for a paired difference ``{"diff", "ci95"}``: is it beyond the bootstrap interval and the seed
    spread (``spread`` None: one seed, no spread to compare with)."""
    d, (lo, hi) = diff["diff"], diff["ci95"]
    beyond_ci = lo > 0 or hi < 0
    if spread is None:
        return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]: {'beyond' if beyond_ci else 'within'} the interval (one seed)"
    beyond_spread = abs(d) > spread
    verdict = ("beyond the interval and the seed spread" if beyond_ci and beyond_spread else
               "beyond the interval, within the seed spread" if beyond_ci else "within the interval")
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}"
