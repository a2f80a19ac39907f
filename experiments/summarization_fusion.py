"""Small-guided-by-large logit fusions on CNN/DailyMail: GPT-2 small (124M) guided by GPT-2 medium (355M).

Reproduces: the fusion experiment of a tutorial blog post on proxy-tuning:
ROUGE-1/2/L of GPT-2 small 32.5/14.2/29.8, GPT-2 medium 36.8/16.5/33.2, direct fusion (s_S + λ·s_L)
34.1/15.3/31.2, temperature-scaled (s_S + λ·s_L/T) 35.2/15.9/32.1, low-confidence masking
(s_S + λ·1[softmax(s_S) < θ]·s_L) 34.8/15.6/31.8. Those are a blog's numbers without a released setup; the
prompt here is GPT-2's zero-shot ``"{article}\\nTL;DR:"`` (Radford et al. 2019), greedy, 100 new tokens, so
expect the *ordering* (small < fused < medium) rather than the absolute values.
Each setting is one :class:`~proxytune_jax.decoding.pipeline.TextGenerator` with a registered fusion rule; scores via
``proxytune_jax.eval.rouge`` (rouge-score, stemming).

Hardware: any single accelerator or a CPU for a few hundred articles (GPT-2 medium fp32 = 1.4 GB).
Mesh: ``MeshConfig(data=-1)``: batch over all devices, params replicated.

    python experiments/summarization_fusion.py --set max_examples=500
    python experiments/summarization_fusion.py --smoke
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (script_entry, Timer, describe_devices, generate_texts,  # noqa: E402
                                 load_model_and_tokenizer, make_mesh_or_none, choose_config, parse_args, print_table, smoke_setup,
                                 write_results)
from experiments.configs.summarization_fusion_config import CONFIG, SummarizationFusionConfig  # noqa: E402


def smoke_config(root: str) -> SummarizationFusionConfig:
    paths, _ = smoke_setup(root, kinds=[("small", "gpt2", 32, 0), ("large", "gpt2", 64, 1)])
    return SummarizationFusionConfig(small=paths["small"], large=paths["large"], data=paths["cnn_dailymail"],
                                     max_examples=2, max_new_tokens=5, batch_size=2,
                                     out_dir=os.path.join(root, "results"))


def run(config: SummarizationFusionConfig) -> dict:
    from proxytune_jax.data.cnn_dailymail import STOP_STRINGS, load_cnn_dailymail, score_rouge
    from proxytune_jax.decoding.pipeline import TextGenerator

    print(f"devices: {describe_devices()}")
    mesh = make_mesh_or_none(config.mesh)
    small, tok_s = load_model_and_tokenizer(config.small, config.dtype, mesh)
    large, tok_l = load_model_and_tokenizer(config.large, config.dtype, mesh)
    examples = load_cnn_dailymail(config.data, split=config.split, max_examples=config.max_examples,
                                  max_article_words=config.max_article_words)
    settings = [("small", TextGenerator([small], [tok_s], "plain", names=["small"], mesh=mesh), None),
                ("large", TextGenerator([large], [tok_l], "plain", names=["large"], mesh=mesh), None)]
    for rule, params in config.fusions:  # the generators check that the tokenizers agree
        settings.append((rule, TextGenerator([small, large], [tok_s, tok_l], rule, names=["small", "large"],
                                             mesh=mesh), dict(params)))
    results, rows = {"config": dataclasses.asdict(config), "settings": {}}, []
    for name, generator, params in settings:
        with Timer() as t:
            outs, _ = generate_texts(generator, ["plain"] * len(generator.tokenizers), examples,
                                     max_new_tokens=config.max_new_tokens, stop_strings=STOP_STRINGS,
                                     batch_size=config.batch_size, fusion_params=params, seed=config.seed,
                                     max_prompt_tokens=1024 - config.max_new_tokens, desc=name)
        scores = score_rouge(examples, outs)
        results["settings"][name] = {**scores, "params": params, "seconds": t.seconds, "sample": outs[:3]}
        rows.append({"setting": name, "rouge1": 100 * scores["rouge1"], "rouge2": 100 * scores["rouge2"],
                     "rougeL": 100 * scores["rougeL"], "seconds": t.seconds})
    print_table(rows, title=f"CNN/DailyMail ROUGE F1 (x100), n={len(examples)}")
    print("results:", write_results(config.out_dir, "summarization_fusion", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "fusion"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
