"""Distilling the proxy-tuned distribution into one model (objective ``proxy_tuned_teacher``), in the toy world.

Teacher: proxy-tuned-large, ``log p_base-large + α·(log p_tuned-small − log p_base-small)`` (α = 1), each model
reading the prompt format it reads when decoding (the bases and the anti-expert the plain question, the expert
its chat template; ``ProxyTunedTeacher``'s per-role rows). Students: base-small and base-large, each trained
on the fused teacher's distribution (forward KL, no gold cross-entropy) at the response tokens of the
instruction-tuning set -- the very prompts and answers tuned-small and tuned-large were tuned on, with the same
replayed raw documents, steps, batch and learning rate (``ToyWorldConfig.tune``) -- over 3 student seeds.

Compared on the held-out questions (people the tuning set never asks about): greedy accuracy of each student
against its own starting point (base-small / base-large), tuned-small, tuned-large and proxy-tuned decoding;
the share of questions where the student's answer equals proxy-tuned decoding's; the share of proxy-tuning's
gain the student recovers, ``(acc_student − acc_start) / (acc_proxy − acc_start)``; and the decoding cost per
generated token (wall time of the greedy generation of every held-out question, after compilation) relative
to the student alone.

    python experiments/toyworld_proxy_distill.py [--world-seeds 0 1 2] [--cache-dir DIR]
                                                 [--out runs/toyworld_proxy_distill] [--smoke]

Reproduces: proxy-tuning's gains (Liu et al. 2024) at one model's decoding cost, by distillation of the
proxy-tuned distribution (objective ``proxy_tuned_teacher``); no paper reports this.
Hardware: a 2-core CPU; about 5 minutes per world once the world is built (the demo's cache is reused).
Mesh: one device (the models are tiny). ``--smoke``: the demo's ``--quick`` world, one world, one student
seed and a few steps, cached in ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from proxytune_jax.atomic import write_json_atomic

STUDENTS = ("base-small", "base-large")


def distillation_rows(tw) -> dict[str, np.ndarray]:
    """The tuning set (chat rows; the base and anti-expert rows hold the plain question and the same response
    in the same columns) followed by the replayed raw documents, as the world's build tunes on them."""
    from proxytune_jax.toyworld.data import _left_pad, chat_prompt_ids, encode_corpus, plain_prompt_ids

    tok, cfg = tw.tokenizer, tw.config
    chat_rows, plain_rows, starts = [], [], []
    for q in tw.world.tune:
        resp = tok(q.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        chat = chat_prompt_ids(tok, q)
        chat_rows.append(chat + resp)
        plain_rows.append(plain_prompt_ids(tok, q) + resp)
        starts.append(len(chat))
    n_replay = int(round(cfg.replay_ratio * len(tw.world.tune)))
    pick = np.random.default_rng(cfg.seed).choice(len(tw.world.corpus), size=n_replay, replace=False)
    docs = encode_corpus(tok, [tw.world.corpus[i] for i in pick])
    width = max([len(r) for r in chat_rows + plain_rows] + [docs["input_ids"].shape[1]])
    chat = _left_pad(chat_rows, starts, tok.pad_token_id, width)
    plain = _left_pad(plain_rows, [len(r) for r in plain_rows], tok.pad_token_id, width)
    docs = {k: np.pad(v, ((0, 0), (width - v.shape[1], 0)), constant_values=tok.pad_token_id if k == "input_ids"
                      else 0) for k, v in docs.items()}
    rows = {k: np.concatenate([chat[k], docs[k]]) for k in chat}
    for role in ("base", "anti_expert"):
        rows[f"{role}_input_ids"] = np.concatenate([plain["input_ids"], docs["input_ids"]])
        rows[f"{role}_attention_mask"] = np.concatenate([plain["attention_mask"], docs["attention_mask"]])
    return rows


def seconds_per_token(generator, tokenizer, questions) -> float:
    """Wall time per generated token of greedy decoding of ``questions`` (second run: compiled)."""
    from proxytune_jax.toyworld.evaluate import generate

    generate(None, tokenizer, questions, chat=(), generator=generator)
    t0 = time.perf_counter()
    out = generate(None, tokenizer, questions, chat=(), generator=generator)
    n = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in out.completions)
    return (time.perf_counter() - t0) / max(n, 1)


def run_world(world_seed: int, cache_dir, progress: bool = True, smoke: bool = False) -> dict:
    from proxytune_jax.commands.demo import configs
    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.eval import extract_answer
    from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld
    from proxytune_jax.toyworld.evaluate import generate
    from proxytune_jax.toyworld.proxy import run_proxy_tuning
    from proxytune_jax.toyworld.train import train_models
    from proxytune_jax.training import ProxyTunedTeacher

    cfg = configs(smoke, world_seed)
    seeds = (0,) if smoke else (0, 1, 2)
    tw = build_toyworld(cfg.toyworld, cache_dir)
    models = {name: tw.load(name) for name in MODEL_NAMES}
    tok, questions = tw.tokenizer, list(tw.world.heldout)
    pt = run_proxy_tuning(models, tok, questions, alphas=(1.0,))
    proxy_answers = [extract_answer(c) for c in pt.completions["proxy-tuned-large"]]
    rows = distillation_rows(tw)
    objective = ProxyTunedTeacher(base="base-large", expert="tuned-small", anti_expert="base-small",
                                  loss="forward_kl", kd_weight=1.0, ce_weight=0.0)
    frozen = {"base": models["base-large"], "expert": models["tuned-small"], "anti_expert": models["base-small"]}
    out = {"reference": dict(pt.accuracy), "students": {}}
    proxy_gen = TextGenerator([models["base-large"], models["tuned-small"], models["base-small"]], [tok] * 3,
                              "proxy_tuning", chat_template=[False, True, False])
    out["seconds_per_token"] = {"proxy-tuned-large": seconds_per_token(proxy_gen, tok, questions)}
    for start in STUDENTS:
        scale = cfg.toyworld.small_tune_lr_scale if start == "base-small" else 1.0
        fit_cfg = dataclasses.replace(cfg.toyworld.tune, learning_rate=cfg.toyworld.tune.learning_rate * scale)
        if smoke:
            fit_cfg = dataclasses.replace(fit_cfg, steps=4, warmup_steps=1)
        t0 = time.perf_counter()
        res = train_models(models[start], rows, objective, fit_cfg, seeds=seeds, frozen_models=frozen,
                           desc=f"distill proxy-tuned-large into {start} (3 seeds)", progress=progress)
        train_s = time.perf_counter() - t0
        accs, agree = [], []
        for m in res.models:
            g = generate([m], tok, questions, chat=[True])
            answers = [extract_answer(c) for c in g.completions]
            accs.append(g.accuracy)
            agree.append(float(np.mean([a is not None and a == b for a, b in zip(answers, proxy_answers)])))
        gain = pt.accuracy["proxy-tuned-large"] - pt.accuracy[start]
        out["students"][start] = {
            "accuracy": accs, "agreement_with_proxy": agree,
            "recovered": [(a - pt.accuracy[start]) / gain if gain > 0 else float("nan") for a in accs],
            "final_kl": [float(x) for x in res.metrics["forward_kl"][:, -1]], "train_s": train_s}
        student_gen = TextGenerator([res.models[0]], [tok], "plain", chat_template=[True])
        out["seconds_per_token"][f"distilled {start}"] = seconds_per_token(student_gen, tok, questions)
    return out


def _ms(xs) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_proxy_distill"))
    ap.add_argument("--smoke", action="store_true", help="the quick world, one world, one seed (a test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"
    results = {w: run_world(w, args.cache_dir, progress=not args.smoke, smoke=args.smoke) for w in args.world_seeds}
    print("\n| world | model | accuracy (held-out) | answer = proxy-tuned's | share of proxy-tuning's gain "
          "recovered | s / token relative to the distilled model |")
    print("|---|---|---|---|---|---|")
    for w, r in results.items():
        ref, spt = r["reference"], r["seconds_per_token"]
        one = spt["distilled base-large"]
        for name in ("base-small", "base-large", "tuned-small", "tuned-large"):
            print(f"| {w} | {name} | {ref[name]:.3f} | | | |")
        print(f"| {w} | proxy-tuned-large (decoding, 3 models) | {ref['proxy-tuned-large']:.3f} | 1 | 1 | "
              f"{spt['proxy-tuned-large'] / one:.2f} |")
        for start in STUDENTS:
            s = r["students"][start]
            print(f"| {w} | {start} distilled from proxy-tuned-large | {_ms(s['accuracy'])} | "
                  f"{_ms(s['agreement_with_proxy'])} | {_ms(s['recovered'])} | "
                  f"{spt[f'distilled {start}'] / one:.2f} |")
    path = args.out / "results" / "toyworld_proxy_distill.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results, indent=1)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
