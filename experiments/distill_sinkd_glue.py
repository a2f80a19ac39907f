"""SinKD on GLUE: distil a fine-tuned teacher into a student with CE, Hinton KD, and KD + Sinkhorn.

Reproduces: Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"
(arXiv 2402.17110), GLUE dev results (teacher → student; the comparison of vanilla KD against KD + Sinkhorn
term). The paper fine-tunes encoder classifiers; here both models are causal LMs that classify by
**verbalizer** (``proxytune_jax.data.glue``: prompt ending in "Answer:", class logits = next-token logits at
the label words' first tokens), so compare the *relative* effect of the Sinkhorn term, not absolute scores.
Objective (paper): ``α·τ²·KL(p_τ‖q_τ) + (1−α)·CE + β·Sinkhorn`` with the
Sinkhorn term ``proxytune_jax.losses.sinkd`` (batch-wise N×N L1 cost between the class distributions at
τ = 2, ε = 0.1, 20 unrolled iterations, weight w = 0.001 as released) and β = 0.8. Unlike the released GLUE
script, the Sinkhorn term is really added. Batch-wise: no gradient accumulation (it would change the loss).
Settings: ``ce`` (student alone), ``kd`` (Hinton KD), ``kd_sinkd``; the teacher is first fine-tuned with CE.
Metrics: the task's official GLUE metrics (``glue_metrics``: accuracy / F1 / Matthews).

Hardware: 7B teacher + 1.1B student fine-tuning in bf16: one 80 GB GPU, or a TPU v4-8 / v5e-8.
Mesh: ``MeshConfig(data=1, fsdp=-1, tensor=1)``: params, moments and batch FSDP-sharded over all devices.

    python experiments/distill_sinkd_glue.py --set task=rte
    python experiments/distill_sinkd_glue.py --smoke
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (script_entry, Timer, class_logits, describe_devices,  # noqa: E402
                                 encode_classification, choose_config, parse_args, predict_class_logits, print_table, smoke_setup,
                                 write_results)
from experiments.configs.distill_sinkd_glue_config import CONFIG, SinkdGlueConfig  # noqa: E402


def smoke_config(root: str) -> SinkdGlueConfig:
    paths, _ = smoke_setup(root, kinds=[("teacher", "llama", 48, 0), ("student", "llama", 32, 1)])
    return SinkdGlueConfig(data=paths["glue"], teacher=paths["teacher"], student=paths["student"],
                           teacher_steps=2, student_steps=2, batch_size=4, max_length=32, learning_rate=1e-3,
                           warmup_steps=0, param_dtype="float32", out_dir=os.path.join(root, "results"))


# ------------------------------------------------------------------------------------------- pieces
def make_loss_fn(graphdef, teacher_graphdef, verbalizer_ids: tuple[int, ...], setting: str, config: SinkdGlueConfig):
    """``loss_fn(params, frozen, batch, rng, extras) -> (loss, metrics)`` (the training-step contract)."""
    import jax
    import jax.numpy as jnp

    from proxytune_jax.losses import cross_entropy, hinton_kd
    from proxytune_jax.losses.sinkd import sinkd

    def loss_fn(params, frozen, batch, rng, extras):
        s = class_logits(graphdef, params, batch, verbalizer_ids)  # [B, C]
        labels = batch["labels"]
        m = jnp.ones(labels.shape, jnp.float32)
        ce = cross_entropy(s, labels, m)
        metrics = {"ce": ce, "tokens": m.sum()}
        if setting == "ce":
            return ce, {**metrics, "loss": ce}
        t = jax.lax.stop_gradient(class_logits(teacher_graphdef, frozen["teacher"], batch, verbalizer_ids))
        kd = hinton_kd(s, t, m, labels=labels, temperature=config.kd_temperature, alpha=config.kd_alpha)
        loss = kd
        metrics["kd"] = kd
        if setting == "kd_sinkd":
            sk = sinkd(s, t, m, temperature=config.sinkhorn_temperature, epsilon=config.sinkhorn_epsilon,
                       num_iters=config.sinkhorn_iters, weight=config.sinkhorn_weight)
            loss = kd + config.sinkhorn_beta * sk
            metrics["sinkhorn"] = sk
        return loss, {**metrics, "loss": loss}

    return loss_fn


def fit(params, rules, mesh, loss_fn, train: dict, steps: int, config: SinkdGlueConfig, frozen=None, desc=""):
    """``steps`` AdamW steps with the library's jitted train step over shuffled batches -> trained params."""
    import jax
    from tqdm.auto import tqdm

    from proxytune_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer
    from proxytune_jax.training.state import init_train_state
    from proxytune_jax.training.step import make_train_step

    opt_cfg = OptimConfig(learning_rate=config.learning_rate, warmup_steps=min(config.warmup_steps, steps),
                          total_steps=steps, weight_decay=0.0)
    optimizer = make_optimizer(opt_cfg)
    state = init_train_state(params, optimizer, rules=rules, mesh=mesh, seed=config.seed)
    step = make_train_step(loss_fn, optimizer, mesh, state_shardings=jax.tree.map(lambda x: x.sharding, state),
                           frozen=frozen, learning_rate_fn=learning_rate_schedule(opt_cfg))
    rng = np.random.default_rng(config.seed)
    n = len(train["labels"])
    order, pos, last = rng.permutation(n), 0, {}
    for _ in tqdm(range(steps), desc=desc, leave=False):
        if pos + config.batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + config.batch_size]
        pos += config.batch_size
        state, last = step(state, {k: v[idx] for k, v in train.items()})
    return state.params, {k: float(v) for k, v in jax.device_get(last).items()}


def run(config: SinkdGlueConfig) -> dict:
    import jax
    import jax.numpy as jnp

    from proxytune_jax import load_pretrained
    from proxytune_jax.data.glue import (get_task, glue_metrics, load_glue, predictions_from_class_logits,
                                         verbalizer_token_ids)
    from proxytune_jax.decoding.vocab import align_vocabularies
    from proxytune_jax.errors import UserError
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import make_mesh, tree_shardings
    from proxytune_jax.training.state import split_params
    from transformers import AutoTokenizer

    task = get_task(config.task)
    if task.regression:
        raise UserError(f"{task.name} is regression: this recipe compares classification objectives; "
                        "use proxytune_jax.losses.sinkd_regression on expected scores for STS-B")
    print(f"devices: {describe_devices()}")
    mesh = make_mesh(config.mesh)
    dtype = getattr(jnp, config.param_dtype)
    tok_t, tok_s = AutoTokenizer.from_pretrained(config.teacher), AutoTokenizer.from_pretrained(config.student)
    teacher, student = load_pretrained(config.teacher, dtype=dtype), load_pretrained(config.student, dtype=dtype)
    align_vocabularies([tok_t, tok_s], [teacher.config.vocab_size, student.config.vocab_size],
                       names=["teacher", "student"])
    verb = tuple(verbalizer_token_ids(task, tok_s))
    folder = os.path.join(config.data, task.name) if os.path.isdir(os.path.join(config.data, task.name)) else config.data
    train = encode_classification(load_glue(task.name, folder, split="train", max_examples=config.max_train_examples), tok_s,
                   config.max_length)
    val_examples = load_glue(task.name, folder, split="validation", max_examples=config.max_eval_examples)
    val = encode_classification(val_examples, tok_s, config.max_length)

    def evaluate(graphdef, params):
        logits = predict_class_logits(graphdef, params, val, verb, config.batch_size)
        return glue_metrics(task, predictions_from_class_logits(task, logits), val["labels"])

    results: dict = {"config": dataclasses.asdict(config), "task": task.name, "settings": {}}
    t_graph, t_params = split_params(teacher)
    t_rules = partition_rules(teacher.config)
    with jax.set_mesh(mesh):
        with Timer() as t:
            if config.teacher_steps:
                t_params, _ = fit(t_params, t_rules, mesh, make_loss_fn(t_graph, None, verb, "ce", config), train,
                                  config.teacher_steps, config, desc="teacher")
            scores = evaluate(t_graph, t_params)
        results["teacher"] = {**scores, "seconds": t.seconds}
        frozen = {"teacher": jax.device_put(t_params, tree_shardings(t_params, t_rules, mesh))}
        s_graph, s_init = split_params(student)
        s_rules = partition_rules(student.config)
        rows = [{"model": "teacher", **{k: v for k, v in results["teacher"].items() if k != "seconds"}}]
        for setting in config.settings:
            if setting not in ("ce", "kd", "kd_sinkd"):
                raise UserError(f"unknown setting {setting!r}; choose from ce, kd, kd_sinkd")
            with Timer() as t:
                params, last = fit(jax.tree.map(jnp.copy, s_init), s_rules, mesh,
                                   make_loss_fn(s_graph, t_graph, verb, setting, config), train,
                                   config.student_steps, config, frozen=None if setting == "ce" else frozen,
                                   desc=setting)
                scores = evaluate(s_graph, params)
            results["settings"][setting] = {**scores, "last_train_metrics": last, "seconds": t.seconds}
            rows.append({"model": f"student:{setting}", **{k: v for k, v in scores.items()}})
    print_table(rows, title=f"{task.name} validation ({', '.join(task.metrics)})")
    print("results:", write_results(config.out_dir, f"distill_sinkd_{task.name}", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "sinkd"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
