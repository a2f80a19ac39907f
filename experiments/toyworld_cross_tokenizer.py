"""Cross-tokenizer proxy-tuning in the toy world: base-large on the world's word-level tokenizer steered by a
small pair on a byte-level BPE, against the same-tokenizer pair, over world seeds (issue #18, item 3).

For each ``--world-seeds`` value: the demo's toy world (built or reused from the demo's cache) and its second
tokenizer with its small pair (``toyworld.bpe_pair.build_bpe_pair``: a byte-level BPE of 320 entries trained on
the same texts, base-small / tuned-small retrained on it with the world's small-model recipe; cached under the
world's folder). On every held-out question, greedy, α = 1, the expert on its chat template:

* ``base-large``, ``tuned-small`` (world tokenizer) and ``tuned-small (BPE)`` alone (the engine);
* ``proxy-tuned, same tokenizer``: base-large + α·(tuned-small − base-small), all on the world tokenizer, the
  engine's full-logit path;
* ``proxy-tuned, cross-tokenizer``: base-large (world tokenizer, its whole vocabulary as candidates: k = V)
  with the BPE pair, aligned through text (``decoding.cross_tokenizer``);
* the check: at α = 0 the cross-tokenizer decoder's base token ids equal base-large's own greedy decoding, on
  every question (reported as the number of questions that differ; must be 0).

Prints accuracy per world, mean ± std (sample std) and the paired difference to same-tokenizer proxy-tuning,
with the decoding times; writes ``results/toyworld_cross_tokenizer.json`` and ``.md`` (atomically). No setting
was chosen after seeing a number (the BPE's size was fixed before the pair was first trained).

    python experiments/toyworld_cross_tokenizer.py [--world-seeds 0 1 2] [--cache-dir DIR]
                                                   [--out runs/toyworld_cross_tokenizer] [--smoke]

Reproduces: no paper table (proxy-tuning, Liu et al. 2024, assumes one shared vocabulary); the setting is issue
#18's small pair from another model family. Hardware: a 2-core CPU; 1-2 minutes to train each world's BPE pair on
first use, then ~5-8 minutes per world on a shared machine (the cross-tokenizer decoder re-reads every candidate's
stream in both small models at every step, 1.5-3 minutes per decode of 200 questions, twice: α = 1 and the α = 0
check). Mesh: one device.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from proxytune_jax.commands.demo import configs
from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld

ALPHA = 1.0
SAME, CROSS = "proxy-tuned, same tokenizer", "proxy-tuned, cross-tokenizer"


def mean_std(xs):
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_world(models: dict, tok, pair, questions) -> dict:
    """Accuracies, the α = 0 check and decoding times on one world (see the module doc)."""
    from proxytune_jax.decoding.blackbox import LocalTopKBase
    from proxytune_jax.decoding.cross_tokenizer import CrossTokenizerGenerator
    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.eval import accuracy
    from proxytune_jax.toyworld.evaluate import MAX_NEW_TOKENS, correct_flags, generate

    prompts, answers = [q.question for q in questions], [q.answer for q in questions]
    base, expert, anti = models["base-large"], models["tuned-small"], models["base-small"]
    bpe_tok, bpe_expert, bpe_anti = pair.tokenizer, pair.load("tuned-small"), pair.load("base-small")
    acc, seconds = {}, {}
    base_gen = TextGenerator([base], [tok], "plain", chat_template=[False])
    base_outs = base_gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts))
    acc["base-large"] = accuracy([o.completion for o in base_outs], answers)
    acc["tuned-small"] = generate([expert], tok, questions, chat=[True]).accuracy
    acc["tuned-small (BPE)"] = generate([bpe_expert], bpe_tok, questions, chat=[True]).accuracy
    t0 = time.perf_counter()
    same = TextGenerator([base, expert, anti], [tok] * 3, "proxy_tuning", chat_template=[False, True, False]
                         ).generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts),
                                    fusion_params={"alpha": ALPHA})
    seconds[SAME] = time.perf_counter() - t0
    acc[SAME] = accuracy([o.completion for o in same], answers)
    v = min(len(tok), base.config.vocab_size)
    cross = CrossTokenizerGenerator(LocalTopKBase(base, tok, k=v), tok, bpe_expert, bpe_anti, bpe_tok,
                                    expert_chat_template=True)
    t0 = time.perf_counter()
    outs = cross.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts),
                          fusion_params={"alpha": ALPHA})
    seconds[CROSS] = time.perf_counter() - t0
    acc[CROSS] = accuracy([o.completion for o in outs], answers)
    zero = cross.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts),
                          fusion_params={"alpha": 0.0})
    differ = sum(z.base_token_ids != b.token_ids for z, b in zip(zero, base_outs))
    return {"accuracy": acc, "alpha0_rows_differing_from_base_greedy": differ, "seconds": seconds, "n": len(questions),
            "divergence": divergence([o.token_ids for o in same], [o.base_token_ids for o in outs],
                                     correct_flags([o.completion for o in same], questions),
                                     correct_flags([o.completion for o in outs], questions), tok, bpe_tok),
            "vocab": {"world": v, "bpe": len(bpe_tok)}, "bpe_pair_timings": pair.timings,
            "examples": [{"question": q.question, "cross": o.completion}
                         for q, o in list(zip(questions, outs))[:3]]}


def divergence(same_ids, cross_ids, same_ok, cross_ok, tok, bpe_tok) -> dict:
    """Where the cross-tokenizer decoding leaves the same-tokenizer one (both are base-tokenizer ids): on the
    questions only same-tokenizer proxy-tuning answers right (``lost``) and only cross-tokenizer does (``won``),
    the first token where the two differ, and how many BPE pieces the cross decoder's token there takes (the
    pair scores it as that many small-model tokens); against the share of multi-piece tokens among all the
    cross decoder chose."""
    def pieces(i):  # the token's text (a word-level token "▁zi" adds " zi") in BPE tokens
        if i in tok.all_special_ids:
            return 0
        text = tok.convert_ids_to_tokens(i).replace("\u2581", " ")
        return len(bpe_tok(text, add_special_tokens=False)["input_ids"])

    def first_split(rows):
        multi = []
        for r in rows:
            a, b = same_ids[r], cross_ids[r]
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if j < len(b):
                multi.append(pieces(b[j]) >= 2)
        return {"n": len(rows), "diverging": len(multi), "multi_piece": int(sum(multi))}

    lost = [r for r in range(len(same_ids)) if same_ok[r] and not cross_ok[r]]
    won = [r for r in range(len(same_ids)) if cross_ok[r] and not same_ok[r]]
    chosen = [pieces(i) >= 2 for ids in cross_ids for i in ids if i not in tok.all_special_ids]
    return {"lost": first_split(lost), "won": first_split(won),
            "multi_piece_share_of_all_chosen": float(sum(chosen) / max(len(chosen), 1))}


def table(per_seed: dict) -> tuple[str, dict]:
    seeds = list(per_seed)
    lines = [f"| setting (α = {ALPHA:g}) | {' | '.join(f'world {s}' for s in seeds)} | mean ± std | "
             f"− same tokenizer (mean ± std) |", "|---" * (len(seeds) + 3) + "|"]
    summary = {}
    for name in per_seed[seeds[0]]["accuracy"]:
        xs = [per_seed[s]["accuracy"][name] for s in seeds]
        diffs = [x - per_seed[s]["accuracy"][SAME] for x, s in zip(xs, seeds)]
        (m, sd), (dm, dsd) = mean_std(xs), mean_std(diffs)
        summary[name] = {"per_seed": xs, "mean": m, "std": sd, "diff_vs_same": diffs, "diff_mean": dm,
                         "diff_std": dsd}
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in xs)
                     + f" | {m:.3f} ± {sd:.3f} | {dm:+.3f} ± {dsd:.3f} |")
    return "\n".join(lines), summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0 only, 8 questions")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_cross_tokenizer"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"

    from proxytune_jax.toyworld.bpe_pair import build_bpe_pair
    per_seed = {}
    for seed in args.world_seeds:
        tw = build_toyworld(configs(args.smoke, seed).toyworld, args.cache_dir)
        pair = build_bpe_pair(tw, progress=not args.smoke)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        questions = list(tw.world.heldout)[:8 if args.smoke else None]
        per_seed[seed] = r = run_world(models, tw.tokenizer, pair, questions)
        print(f"world seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items())
              + f"; α = 0 rows differing from base-large's greedy decoding: "
              f"{r['alpha0_rows_differing_from_base_greedy']}; seconds "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()), flush=True)

    text, summary = table(per_seed)
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    note = (f"{first['n']} held-out questions per world; greedy; base-large on the world tokenizer "
            f"(V = {first['vocab']['world']}), the cross-tokenizer pair on a byte-level BPE "
            f"(V = {first['vocab']['bpe']}); α = 0 rows differing from base-large's greedy decoding per world: "
            + ", ".join(str(per_seed[s]["alpha0_rows_differing_from_base_greedy"]) for s in seeds)
            + "; questions only same-tokenizer proxy-tuning answers right (first divergence at a token the BPE "
            "splits into ≥ 2 pieces) per world: "
            + ", ".join(f"{per_seed[s]['divergence']['lost']['n']} ({per_seed[s]['divergence']['lost']['multi_piece']})"
                        for s in seeds)
            + "; only cross-tokenizer: "
            + ", ".join(f"{per_seed[s]['divergence']['won']['n']} ({per_seed[s]['divergence']['won']['multi_piece']})"
                        for s in seeds)
            + "; share of multi-piece tokens among all the cross decoder chose: "
            + ", ".join(f"{per_seed[s]['divergence']['multi_piece_share_of_all_chosen']:.3f}" for s in seeds)
            + "; decoding seconds (same / cross) per world: "
            + ", ".join(f"{per_seed[s]['seconds'][SAME]:.1f} / {per_seed[s]['seconds'][CROSS]:.1f}" for s in seeds))
    print("\n" + text + "\n\n" + note)
    results = {"per_seed": per_seed, "summary": summary, "alpha": ALPHA}
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    from proxytune_jax.atomic import write_json_atomic, write_text_atomic
    write_json_atomic(out / "toyworld_cross_tokenizer.json", results)
    write_text_atomic(out / "toyworld_cross_tokenizer.md", text + "\n\n" + note + "\n")
    print(f"wrote {out / 'toyworld_cross_tokenizer.json'} and {out / 'toyworld_cross_tokenizer.md'}")
    return results


if __name__ == "__main__":
    main()
