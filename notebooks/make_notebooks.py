"""Generate ``proxy_tuning.ipynb`` and ``distillation.ipynb`` (stored without outputs) from the cell sources
below: edit here, then run ``python notebooks/make_notebooks.py``. ``tests/test_notebooks.py`` checks that the
stored notebooks match this file and executes them headless at the tiny toy-world size."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
# This repository's URL: the one place to set it. The Colab install cell and the README's "Open in Colab" links
# (rewritten by this script between the colab-links markers) are made from it.
REPO_URL = "https://github.com/OWNER/proxytune_jax"
BRANCH = "main"

INSTALL = f'''\
# Colab: install proxytune_jax from the repository. Elsewhere this cell does nothing: run the notebook from a
# checkout where `pip install -e .` was done.
import os, subprocess, sys

IN_COLAB = "google.colab" in sys.modules
REPO_URL = os.environ.get("PROXYTUNE_REPO_URL", "{REPO_URL}")
if IN_COLAB:
    if "OWNER" in REPO_URL:
        raise RuntimeError("set REPO_URL (or the PROXYTUNE_REPO_URL variable) to this repository's git URL")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"git+{{REPO_URL}}"])'''

SETUP = '''\
# The same code runs on TPU, GPU or CPU: JAX picks the accelerator it finds, and the meshes below span all of
# its devices (one device on a plain CPU; the tests simulate 8 with XLA_FLAGS=--xla_force_host_platform_device_count=8).
import os, time
import jax
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from proxytune_jax.sharding import MeshConfig, make_mesh

# "tiny" (used by the tests, ~1 minute on a CPU) or "small" (the `proxytune demo` world: a few minutes on a
# CPU, well under a minute on an accelerator). Set PROXYTUNE_NOTEBOOK_SIZE before starting the kernel.
SIZE = os.environ.get("PROXYTUNE_NOTEBOOK_SIZE", "small")
n_devices = jax.device_count()
# Decoding: data parallel, each batch of prompts split over every device (the models replicated).
decode_mesh = make_mesh(MeshConfig(data=-1))
# Training: batches over data x fsdp, params and optimizer moments sharded over fsdp (2 when it divides).
train_mesh = make_mesh(MeshConfig(data=-1, fsdp=2 if n_devices % 2 == 0 else 1))
print(f"{n_devices} {jax.devices()[0].platform} device(s) | size: {SIZE}")
print("decode mesh", dict(decode_mesh.shape), "| train mesh", dict(train_mesh.shape))'''

WORLD = '''\
# The toy world (proxytune_jax.toyworld): invented people own coins. Their coin counts appear only in a raw
# pretraining corpus; the answer *format* ("... #### N") appears only in instruction data about other people.
# Four Llama-architecture models are trained once and cached: base-small/-large (corpus only) and
# tuned-small/-large (instruction-tuned from them).
from proxytune_jax import load_pretrained
from proxytune_jax.toyworld.build import MODEL_NAMES, ToyWorldConfig, build_toyworld
from proxytune_jax.toyworld.train import FitConfig
from proxytune_jax.toyworld.world import WorldConfig

if SIZE == "tiny":
    config = ToyWorldConfig(
        world=WorldConfig(num_people=24, corpus_docs=160, tune_examples=64, eval_questions=16),
        pretrain=FitConfig(steps=30, batch_size=16, learning_rate=3e-3, warmup_steps=3),
        tune=FitConfig(steps=10, batch_size=16, learning_rate=1e-3, warmup_steps=1))
else:
    config = ToyWorldConfig()
t0 = time.perf_counter()
tw = build_toyworld(config)
models = {name: load_pretrained(tw.model_path(name)) for name in MODEL_NAMES}
tok = tw.tokenizer
questions = list(tw.world.heldout)
print(f"toy world ready in {time.perf_counter() - t0:.1f}s ({tw.root})")
print("example question:", questions[0].question, "->", questions[0].answer)'''

PT_INTRO = """\
# Proxy-tuning in the toy world

Proxy-tuning (Liu et al. 2024) steers a large **base** model with the difference between a small **tuned**
expert and its small **untuned** anti-expert, at decoding time only:

$$\\log p_{\\text{proxy}}(x) = \\log p_{M}(x) + \\alpha\\,\\big(\\log p_{M^+}(x) - \\log p_{M^-}(x)\\big).$$

Here the large base knows the held-out people's coins (from pretraining) but not the answer format; the small
tuned model knows the format but not the facts. The notebook compares the base, the tuned models and the
proxy-tuned large model on held-out questions, sweeps α, and tries DExperts. Every model keeps its own prompt:
the expert reads the chat template, base and anti-expert the plain question (`docs/methods.md` §1.7)."""

PT_EVAL = '''\
from proxytune_jax.eval import gap_closed
from proxytune_jax.toyworld.evaluate import generate

m = models
runs = {
    "base-large": generate([m["base-large"]], tok, questions, chat=[False], mesh=decode_mesh),
    "tuned-small (expert)": generate([m["tuned-small"]], tok, questions, chat=[True], mesh=decode_mesh),
    "proxy-tuned large": generate([m["base-large"], m["tuned-small"], m["base-small"]], tok, questions,
                                  chat=[False, True, False], rule="proxy_tuning", fusion_params={"alpha": 1.0},
                                  analysis=True, mesh=decode_mesh),
    "tuned-large (target)": generate([m["tuned-large"]], tok, questions, chat=[True], mesh=decode_mesh),
}
table = pd.DataFrame({"held-out accuracy": {k: r.accuracy for k, r in runs.items()}})
gap = gap_closed(runs["base-large"].accuracy, runs["proxy-tuned large"].accuracy, runs["tuned-large (target)"].accuracy)
print(f"gap closed: {gap:.2f}   top-1 tokens changed vs the base: {runs['proxy-tuned large'].changed_share:.1%}")
table'''

PT_EXAMPLES = '''\
# What the models write for a few held-out questions.
pd.DataFrame({"question": [q.question for q in questions[:4]],
              "gold": [q.answer for q in questions[:4]],
              **{k: r.completions[:4] for k, r in runs.items()}})'''

PT_SWEEP = '''\
# α sweep: α is a traced argument of the compiled decoder, so one TextGenerator serves every value; its
# batches are split over the decode mesh.
from proxytune_jax.decoding.pipeline import TextGenerator

gen = TextGenerator([m["base-large"], m["tuned-small"], m["base-small"]], [tok] * 3, "proxy_tuning",
                    chat_template=[False, True, False], mesh=decode_mesh)
alphas = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0] if SIZE != "tiny" else [0.0, 1.0, 2.0]
accs = [generate([], tok, questions, chat=[False, True, False], fusion_params={"alpha": a}, generator=gen).accuracy
        for a in alphas]
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(alphas, accs, "o-", label="proxy-tuned large")
ax.axhline(runs["base-large"].accuracy, color="gray", ls="--", label="base-large")
ax.axhline(runs["tuned-large (target)"].accuracy, color="green", ls=":", label="tuned-large")
ax.set_xlabel("alpha"); ax.set_ylabel("held-out accuracy"); ax.legend(fontsize=8); ax.set_ylim(-0.02, 1.02)
plt.show()'''

PT_RULES = '''\
# Other decoding-time rules on the same three models (proxytune_jax.decoding.fusion): DExperts truncates the
# base to its top-p nucleus before adding the expert difference (α 2, filter_p 0.9 by default).
trio = [m["base-large"], m["tuned-small"], m["base-small"]]
rules = {"proxy_tuning (alpha 1)": ("proxy_tuning", {"alpha": 1.0}),
         "dexperts (alpha 2, p 0.9)": ("dexperts", {"alpha": 2.0, "filter_p": 0.9})}
pd.DataFrame({"held-out accuracy": {
    name: generate(trio, tok, questions, chat=[False, True, False], rule=rule, fusion_params=params,
                   mesh=decode_mesh).accuracy
    for name, (rule, params) in rules.items()}})'''

D_INTRO = """\
# Knowledge distillation in the toy world

The instruction-tuned large model (teacher) is distilled into the small *base* model (student) on the
instruction data, with several losses of `proxytune_jax.losses` (`docs/methods.md` §2): forward KL, reverse KL
(MiniLLM), JS, TVD, skew KL (DistiLLM), generalized JSD (GKD), adaptive KL, and FIRST's top-5 teacher. Plain
SFT on the gold answers is the baseline. We report held-out question accuracy (greedy generation), the
response-token NLL and the calibration (ECE, reliability diagram) under teacher forcing."""

D_SETUP = '''\
import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from proxytune_jax.losses.first import topk_from_logits, topk_kl
from proxytune_jax.toyworld.data import encode_instructions
from proxytune_jax.toyworld.evaluate import generate
from proxytune_jax.training import SFT, Objective, OnlineDistillation, OptimConfig, fit
from proxytune_jax.training.objectives import model_logits, shifted, token_cross_entropy
from proxytune_jax.training.state import split_params

teacher = models["tuned-large"]
train_data = encode_instructions(tok, tw.world.tune)
heldout_data = encode_instructions(tok, tw.world.heldout)
steps = 10 if SIZE == "tiny" else 150
batch_size = 16 if SIZE == "tiny" else 32
optim = OptimConfig(learning_rate=1e-3, warmup_steps=max(1, steps // 10),
                    weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class FirstOnTheFly(Objective):
    """FIRST with the teacher's top-k computed inside the step (experiments/distill_first.py caches it on disk
    and trains with the library's OfflineTopK). A new objective: a frozen dataclass with a loss_fn."""

    name: ClassVar[str] = "first_on_the_fly"
    teacher: str = "tuned-large"
    k: int = 5
    temperature: float = 1.0

    def frozen_models(self):
        return {"teacher": self.teacher}

    def loss_fn(self, student_graph, frozen_graphs):
        t_graph, k, tau = frozen_graphs["teacher"], self.k, self.temperature

        def loss_fn(params, frozen, batch, rng, state):
            labels, mask = shifted(batch)
            student = model_logits(student_graph, params, batch)
            t = topk_from_logits(jax.lax.stop_gradient(model_logits(t_graph, frozen["teacher"], batch)), k)
            kd = topk_kl(student, t, mask, temperature=tau, mode="renormalize")
            ce = token_cross_entropy(student, labels, mask)
            return kd, {"loss": kd, "topk_kl": kd, "ce": ce, "tokens": jnp.sum(mask, dtype=jnp.int32)}

        return loss_fn


# loss name -> loss_params (a hyperparameter not given keeps the loss's own default: temperature 1 here)
LOSSES = {"forward_kl": {}, "reverse_kl": {}, "js_divergence": {}, "tv_distance": {},
          "skew_forward_kl": {"alpha": 0.1}, "generalized_jsd": {"beta": 0.5}, "adaptive_kl": {"mu": 0.5}}
if SIZE == "tiny":
    LOSSES = {k: LOSSES[k] for k in ("reverse_kl",)}
print(f"{len(train_data['input_ids'])} training rows, {steps} steps per loss")'''

D_TRAIN = '''\
# Every run is training.fit: the library's train step and optimizer on in-memory arrays, with an objective.
objectives = {"sft (gold answers)": SFT(), "first top-5": FirstOnTheFly(teacher="tuned-large")}
for name, params in LOSSES.items():
    objectives[name] = OnlineDistillation(teacher="tuned-large", loss=name, loss_params=params)
students, curves = {}, {}
for name, objective in objectives.items():
    t0 = time.perf_counter()
    frozen = {"teacher": teacher} if objective.frozen_models() else None  # the frozen teacher, by its role
    result = fit(models["base-small"], train_data, objective, steps=steps, batch_size=batch_size, optim=optim,
                 frozen_models=frozen, desc=name)  # trains a copy: models["base-small"] is left as it is
    students[name], curves[name] = result.model, result.metrics["loss"][0]
    print(f"{name:22s} final loss {curves[name][-1]:.4f}  ({time.perf_counter() - t0:.1f}s)")

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, c in curves.items():
    ax.plot(np.asarray(c) / max(c[0], 1e-9), label=name)
ax.set_xlabel("step"); ax.set_ylabel("loss / initial loss"); ax.legend(fontsize=7); plt.show()'''

D_EVAL = '''\
from proxytune_jax.eval.calibration import expected_calibration_error, plot_reliability_diagram, top1_confidence_and_correct


def teacher_forced(model, data):
    """Response-token NLL and (confidence, correct) of the top-1 prediction, held-out gold answers."""
    graph, params = split_params(model)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    logits = np.asarray(jax.jit(lambda p, b: model_logits(graph, p, b))(params, batch))
    labels, mask = (np.asarray(x) for x in shifted(batch))
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = float(-(np.take_along_axis(logp, labels[..., None], -1)[..., 0] * mask).sum() / mask.sum())
    return nll, top1_confidence_and_correct(logits, labels, mask)


rows, diagram = {}, {}
for name, model in {"teacher (tuned-large)": teacher, **students}.items():
    nll, (conf, corr) = teacher_forced(model, heldout_data)
    acc = generate([model], tok, questions, chat=[True], mesh=decode_mesh).accuracy
    rows[name] = {"held-out accuracy": acc, "response NLL": nll, "ECE (10 bins)": expected_calibration_error(conf, corr, 10),
                  "ECE (15 bins)": expected_calibration_error(conf, corr, 15)}
    diagram[name] = (conf, corr)
pd.DataFrame(rows).T'''

D_PLOT = '''\
from IPython.display import Image, display

keep = ["teacher (tuned-large)", "sft (gold answers)", "forward_kl", "first top-5"]
path = "reliability_toyworld.png"
plot_reliability_diagram({k: diagram[k] for k in keep if k in diagram}, path, n_bins=10,
                         title="held-out response tokens")
display(Image(path))'''

D_SHARDED_INTRO = """\
## A distillation run sharded over the mesh, with TensorBoard and generation-based evaluation

`proxytune_jax.training.train` is what `proxytune train` runs: the student's params and optimizer state are
sharded over the `fsdp` axis of `train_mesh`, each batch over `data x fsdp`, the teacher is frozen beside it.
The run writes `metrics.jsonl`, TensorBoard events (`tensorboard --logdir distill_run`), checkpoints and a
Hugging Face folder; `gen_eval` decodes greedy answers to the held-out questions during training and scores
them (accuracy, ROUGE). `training.curves.plot_curves` draws the curves without TensorBoard."""

D_SHARDED = '''\
import json
from pathlib import Path

from IPython.display import Image, display

from proxytune_jax.training import (CheckpointConfig, DataConfig, GenEvalConfig, ModelConfig, OnlineDistillation,
                                    OptimConfig, TrainConfig, train)
from proxytune_jax.training.curves import plot_curves

run_dir = Path("distill_run")
rows = lambda qs: "".join(json.dumps({"prompt": q.question, "response": q.answer}) + "\\n" for q in qs)
Path("toy_train.jsonl").write_text(rows(tw.world.tune))
Path("toy_heldout.jsonl").write_text(rows(questions))
tok.save_pretrained("toy_tokenizer")  # the toy models' folders hold weights only
run_steps = 6 if SIZE == "tiny" else 100
rows_per_step = 2 * n_devices * (1 if SIZE == "tiny" else 4)  # a multiple of data x fsdp
config = TrainConfig(
    model=ModelConfig(student=str(tw.model_path("base-small")), tokenizer="toy_tokenizer"),
    data=DataConfig(train_file="toy_train.jsonl", eval_file="toy_heldout.jsonl", max_length=tw.config.max_length,
                    batch_size=rows_per_step),
    objective=OnlineDistillation(teacher=str(tw.model_path("tuned-large")), loss="forward_kl"),
    optim=OptimConfig(learning_rate=1e-3, warmup_steps=max(1, run_steps // 10), weight_decay=0.0),
    checkpoint=CheckpointConfig(save_every=run_steps), steps=run_steps, log_every=max(1, run_steps // 10),
    eval_every=run_steps // 2,
    gen_eval=GenEvalConfig(every=run_steps, max_new_tokens=32, batch_size=rows_per_step, metrics=("accuracy", "rouge"),
                           max_prompts=len(questions)))
result = train(config, run_dir, mesh=train_mesh, progress=False, return_state=True)
specs = [x.sharding.spec for x in jax.tree.leaves(result.state.params)]
print(f"{sum('fsdp' in str(sp) for sp in specs)} of {len(specs)} student param arrays sharded over fsdp on",
      dict(train_mesh.shape))
print("held-out eval:", {k: round(v, 4) for k, v in result.eval_metrics.items()})
print("generation-based eval:", {k: round(v, 4) for k, v in result.gen_eval_metrics.items()})
plot_curves([run_dir], "distill_curves.png", ["train/loss", "eval/loss", "gen_eval/accuracy"])
display(Image("distill_curves.png"))'''

NOTEBOOKS = {
    "proxy_tuning.ipynb": [("md", PT_INTRO), ("code", INSTALL), ("code", SETUP), ("code", WORLD), ("code", PT_EVAL),
                           ("code", PT_EXAMPLES), ("code", PT_SWEEP), ("code", PT_RULES)],
    "distillation.ipynb": [("md", D_INTRO), ("code", INSTALL), ("code", SETUP), ("code", WORLD), ("code", D_SETUP),
                           ("code", D_TRAIN), ("code", D_EVAL), ("code", D_PLOT), ("md", D_SHARDED_INTRO),
                           ("code", D_SHARDED)],
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"  # Colab: ask for an accelerator (TPU works too; CPU is fine for "small")
    for i, (kind, src) in enumerate(NOTEBOOKS[name]):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell["id"] = f"cell-{i}"  # stable ids: regenerating gives identical files
        if kind == "code" and src is INSTALL:
            cell.metadata["tags"] = ["colab-install"]
        nb.cells.append(cell)
    return nb


COLAB_START, COLAB_END = "<!-- colab-links (notebooks/make_notebooks.py) -->", "<!-- /colab-links -->"


def colab_url(name: str) -> str:
    path = REPO_URL.removeprefix("https://github.com/").removesuffix(".git")
    return f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{name}"


def colab_links() -> str:
    """The README's block of "Open in Colab" links, from REPO_URL."""
    links = " ".join(f"[Open `{name}` in Colab]({colab_url(name)})" for name in NOTEBOOKS)
    return f"{COLAB_START}\n{links}\n{COLAB_END}"


def readme_with_links(text: str) -> str:
    start, end = text.index(COLAB_START), text.index(COLAB_END) + len(COLAB_END)
    return text[:start] + colab_links() + text[end:]


def main(argv=None) -> int:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print("wrote", HERE / name)
    README.write_text(readme_with_links(README.read_text()))
    print("wrote the Colab links of", README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
