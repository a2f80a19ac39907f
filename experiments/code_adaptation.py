"""Code adaptation by proxy: Llama-2-13B steered by CodeLlama-7B-Python (expert) vs Llama-2-7B (anti-expert).

Reproduces: Liu et al. 2024 (arXiv 2401.08565), code-adaptation results (HumanEval; the paper's table also
reports DS-1000): proxy-tuned 13B/70B Llama-2 against the base and against CodeLlama of the same size.
The paper's numbers are not restated here; compare the printed pass@k with that table.
Settings: base alone, proxy-tuned (α = 1), expert alone. HumanEval prompt as is (every model is a base code/
text model: no chat template), nucleus sampling (T 0.8, top-p 0.95), ``num_samples`` per problem, stop at
``\\nclass``/``\\ndef``/``\\n#``/``\\nif``/``\\nprint``. CodeLlama's tokenizer has 16 extra ids past Llama-2's
32000; the shared range is checked by ``TextGenerator`` (``align_vocabularies``) and used for the fusion.
Completions are written as ``samples_{setting}.jsonl`` (HumanEval's ``{task_id, completion}`` format, for
``evaluate_functional_correctness``); with ``execute_code=True`` pass@k is computed here by running the unit
tests in subprocesses (``proxytune_jax.data.humaneval``: executes model-written code, sandbox only).

Hardware: 13B + 2×7B bf16 ≈ 54 GB: one 80 GB GPU or a TPU v4-8 / v5e-8.
Mesh: ``MeshConfig(data=1, fsdp=-1, tensor=1)`` (params FSDP over all devices, batch over data × fsdp).

    python experiments/code_adaptation.py --set execute_code=true
    python experiments/code_adaptation.py --smoke
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (script_entry, Timer, describe_devices, generate_texts,  # noqa: E402
                                 load_model_and_tokenizer, make_mesh_or_none, choose_config, parse_args, print_table, smoke_setup,
                                 write_results)
from experiments.configs.code_adaptation_config import CONFIG, CodeAdaptationConfig  # noqa: E402


def smoke_config(root: str) -> CodeAdaptationConfig:
    paths, _ = smoke_setup(root, kinds=[("base", "llama", 48, 0), ("expert", "llama", 32, 1),
                                        ("anti_expert", "llama", 32, 2)])
    return CodeAdaptationConfig(base=paths["base"], expert=paths["expert"], anti_expert=paths["anti_expert"],
                                data=paths["humaneval"], num_samples=2, ks=(1, 2), max_new_tokens=5,
                                execute_code=True, batch_size=1, dtype="float32",
                                out_dir=os.path.join(root, "results"))


def run(config: CodeAdaptationConfig) -> dict:
    from proxytune_jax.data import humaneval
    from proxytune_jax.decoding.pipeline import TextGenerator

    print(f"devices: {describe_devices()}")
    mesh = make_mesh_or_none(config.mesh)
    base, tok_b = load_model_and_tokenizer(config.base, config.dtype, mesh)
    expert, tok_e = load_model_and_tokenizer(config.expert, config.dtype, mesh)
    anti, tok_a = load_model_and_tokenizer(config.anti_expert, config.dtype, mesh)
    examples = humaneval.load_humaneval(config.data, max_examples=config.max_examples)
    settings = [("base", TextGenerator([base], [tok_b], "plain", names=["base"], mesh=mesh), None),
                ("proxy", TextGenerator([base, expert, anti], [tok_b, tok_e, tok_a], "proxy_tuning",
                                        names=["base", "expert", "anti-expert"], mesh=mesh), {"alpha": config.alpha}),
                ("expert", TextGenerator([expert], [tok_e], "plain", names=["expert"], mesh=mesh), None)]
    os.makedirs(config.out_dir, exist_ok=True)
    results, rows = {"config": dataclasses.asdict(config), "settings": {}}, []
    for name, generator, params in settings:
        samples = [[] for _ in examples]
        with Timer() as t:
            for j in range(config.num_samples):
                outs, _ = generate_texts(generator, ["plain"] * len(generator.tokenizers), examples,
                                         max_new_tokens=config.max_new_tokens, stop_strings=humaneval.STOP_STRINGS,
                                         batch_size=config.batch_size, fusion_params=params,
                                         temperature=config.temperature, top_p=config.top_p,
                                         seed=config.seed + 1000 * j, desc=f"{name} sample {j}")
                for i, o in enumerate(outs):
                    samples[i].append(humaneval.truncate_completion(o))
        path = os.path.join(config.out_dir, f"samples_{name}.jsonl")
        with open(path, "w") as f:
            for ex, ss in zip(examples, samples):
                for s in ss:
                    f.write(json.dumps({"task_id": ex.id, "completion": s}) + "\n")
        entry = {"samples_file": path, "seconds": t.seconds}
        if config.execute_code:
            entry.update(humaneval.score_pass_at_k(examples, samples, ks=config.ks))
        results["settings"][name] = entry
        rows.append({"setting": name, **{f"pass@{k}": entry.get(f"pass@{k}") for k in config.ks}, "seconds": t.seconds})
    print_table(rows, title=f"HumanEval pass@k (n={config.num_samples}, T={config.temperature})"
                + ("" if config.execute_code else " -- execute_code=False: run evaluate_functional_correctness"))
    print("results:", write_results(config.out_dir, "code_adaptation", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "code"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
