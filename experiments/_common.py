"""Shared plumbing of the experiment scripts: argument parsing, config overrides, meshes, model loading,
prompt encoding per model view, batched decoding with the library's :class:`~proxytune_jax.decoding.pipeline.
TextGenerator`, results files, and the tiny random checkpoints that ``--smoke`` runs use.

Nothing here is a method: the methods live in ``proxytune_jax``; this only wires them together.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # `python experiments/x.py` from anywhere: make `experiments.configs` importable
    sys.path.insert(0, str(_REPO))


# ------------------------------------------------------------------------------------------- CLI/config
def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Common flags: ``--smoke`` (tiny random models + tiny data written to ``--out``), ``--out``,
    ``--set key=value`` config overrides (repeatable; see :func:`apply_overrides`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run end to end on tiny random models and tiny data")
    p.add_argument("--out", default=None, help="results folder (default: the config's out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set alpha=0.8 --set max_examples=50 (JSON values); "
                        "a dotted key reaches inside a nested config, e.g. --set train.steps=10 "
                        "--set train.optim.learning_rate=1e-4 --set mesh.fsdp=2")
    return p.parse_args(argv)


def _parse_value(raw: str):
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a bare word is a string
    return tuple(value) if isinstance(value, list) else value


def _override(node, path: list[str], raw: str, where: str):
    """``node`` (a dataclass) with the field at ``path`` set from ``raw``. A ``TrainConfig`` inside an
    experiment config takes the rest of the path through the library's own ``apply_overrides`` (typed, with
    ``objective.name`` switching objectives); other nested dataclasses (a ``MeshConfig``) by field name."""
    from proxytune_jax.errors import UserError
    from proxytune_jax.training.config import TrainConfig, apply_overrides as train_overrides

    if isinstance(node, TrainConfig):
        inner = ".".join(path)
        try:
            return train_overrides(node, [f"{inner}={raw}"])
        except UserError as err:  # name the key as the user wrote it (train.optim.…, not optim.…)
            raise UserError(str(err).replace(f"--set {inner}", f"--set {where}", 1)) from None
    names = {f.name for f in dataclasses.fields(node)}
    key, rest = path[0], path[1:]
    if key not in names:
        raise UserError(f"--set {where}: {key!r} is not a field of {type(node).__name__}; fields: "
                        f"{', '.join(sorted(names))}")
    current = getattr(node, key)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise UserError(f"--set {where}: {key} is not a nested config")
        return dataclasses.replace(node, **{key: _override(current, rest, raw, where)})
    if dataclasses.is_dataclass(current):
        raise UserError(f"--set {where}: {key} is a {type(current).__name__}; set one of its fields "
                        f"(--set {where}.FIELD=VALUE)")
    return dataclasses.replace(node, **{key: _parse_value(raw)})


def apply_overrides(config, overrides: Sequence[str]):
    """A copy of the dataclass ``config`` with ``key=value`` overrides (JSON values, else strings; lists become
    tuples). Dotted keys set fields of nested configs: ``train.steps=10``, ``train.optim.learning_rate=1e-4``,
    ``train.objective.loss_params.temperature=2``, ``mesh.fsdp=2``."""
    from proxytune_jax.errors import UserError

    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        config = _override(config, key.split("."), value, key)
    return config


def choose_config(args: argparse.Namespace, config, smoke_config, prefix: str):
    """The config a script runs: with ``--smoke`` the tiny one (models and data written to ``--out`` or a
    temp folder), else ``config`` with ``--out`` as its ``out_dir``; ``--set`` overrides applied last."""
    if args.smoke:
        config = smoke_config(args.out or tempfile.mkdtemp(prefix=f"smoke_{prefix}_"))
    elif args.out:
        config = dataclasses.replace(config, out_dir=args.out)
    return apply_overrides(config, args.set)


def config_record(config) -> dict:
    """A JSON-ready dict of an experiment config (nested ``TrainConfig`` and objectives included, each
    objective with its ``name``), for the results file."""
    from proxytune_jax.training.config import to_dict

    return to_dict(config)


def make_mesh_or_none(mesh_config):
    """The ``("data", "fsdp", "tensor")`` mesh of ``mesh_config`` (a ``MeshConfig``), or None on one device."""
    import jax

    from proxytune_jax.sharding import make_mesh

    if mesh_config is None or len(jax.devices()) == 1:
        return None
    return make_mesh(mesh_config)


def describe_devices() -> str:
    import jax

    d = jax.devices()
    return f"{len(d)} x {d[0].platform}:{getattr(d[0], 'device_kind', '?')}"


# ------------------------------------------------------------------------------------------- models
def load_model_and_tokenizer(path: str, dtype: str = "bfloat16", mesh=None):
    """A checkpoint folder -> (model, tokenizer) via ``proxytune_jax.load_pretrained`` and AutoTokenizer."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from proxytune_jax import load_pretrained
    from proxytune_jax.errors import UserError

    if not os.path.isdir(path):
        raise UserError(f"model folder {path!r} does not exist; download the checkpoint (config.json, "
                        "*.safetensors, tokenizer files) and pass its local path in the config")
    model = load_pretrained(path, dtype=getattr(jnp, dtype), mesh=mesh)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def encode_view(tokenizer, example, view: str) -> list[int]:
    """Token ids of one example for one model: ``view="plain"`` tokenizes ``example.prompt`` with the
    tokenizer's own special tokens; ``view="chat"`` renders ``chat_prompt`` (template + response prefix),
    whose text already carries any BOS, so no special tokens are added."""
    from proxytune_jax.data.prompts import chat_prompt

    if view == "plain":
        return list(tokenizer(example.prompt)["input_ids"])
    if view == "chat":
        return list(tokenizer(chat_prompt(example, tokenizer), add_special_tokens=False)["input_ids"])
    raise ValueError(f"unknown prompt view {view!r} (plain or chat)")


def generate_texts(generator, views: Sequence[str], examples: Sequence, *, max_new_tokens: int,
                   stop_strings: Sequence[str] = (), batch_size: int = 8, fusion_params: dict | None = None,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, analysis: bool = False,
                   max_prompt_tokens: int | None = None, desc: str = "decode"):
    """Decode ``examples`` with a :class:`proxytune_jax.decoding.pipeline.TextGenerator` (models in the rule's
    role order), model i reading its prompt in ``views[i]`` ("plain" or "chat", see :func:`encode_view`).
    ``max_prompt_tokens`` keeps the end of longer prompts. Returns ``(texts, changed_share)``: completions
    trimmed at the stop strings, and the share of generated tokens whose combined top-1 differs from model 0's
    (None unless ``analysis``)."""
    from tqdm.auto import tqdm

    from proxytune_jax.errors import UserError

    encoded = []
    for tok, view, ctx, name in zip(generator.tokenizers, views, generator.contexts, generator.names):
        seqs = [encode_view(tok, ex, view) for ex in examples]
        if max_prompt_tokens is not None:
            seqs = [s[-max_prompt_tokens:] for s in seqs]
        longest = max(len(s) for s in seqs)
        if longest + max_new_tokens > ctx:
            raise UserError(f"a prompt has {longest} tokens for {name}; with max_new_tokens={max_new_tokens} that "
                            f"exceeds its context of {ctx}; lower max_new_tokens or truncate the prompts")
        encoded.append(seqs)
    n_batches = -(-len(examples) // batch_size)
    with tqdm(total=n_batches, desc=desc, leave=False) as bar:
        outs = generator.generate([ex.prompt for ex in examples], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, fusion_params=fusion_params, temperature=temperature,
                                  top_p=top_p, seed=seed, stop_strings=stop_strings, analysis=analysis,
                                  encoded=encoded, progress=bar.update)
    texts = [o.completion for o in outs]
    changed = None
    if analysis:
        flags = [c for o in outs for c in o.analysis["changed"]]
        changed = float(np.mean(flags)) if flags else None
    return texts, changed


# ------------------------------------------------------------------------------------------- results
def write_results(out_dir: str, name: str, results: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=_jsonable)
    return path


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def print_table(rows: Sequence[dict], title: str = "") -> str:
    """A plain-text table of dict rows (same keys), printed and returned."""
    if not rows:
        return ""
    keys = [str(k) for k in rows[0]]
    rows = [{str(k): v for k, v in r.items()} for r in rows]
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [title] if title else []
    lines.append("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


# ------------------------------------------------------------------------------------------- smoke
def write_jsonl(path: str, rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def smoke_tokenizer(texts: Sequence[str], out_dir: str):
    """A word-level tokenizer with a chat template over ``texts`` (the toy world's), saved to ``out_dir``."""
    from proxytune_jax.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(list(texts) + ["Answer : Question The answer is TL;DR: ####"])
    tok.save_pretrained(out_dir)
    return tok


def smoke_checkpoint(out_dir: str, tokenizer, *, model_type: str = "llama", seed: int = 0, hidden: int = 32,
                     layers: int = 2, vocab_pad: int = 0, max_positions: int = 512) -> str:
    """A tiny random checkpoint (HF folder + tokenizer) built with ``init_model`` and ``save_pretrained``.
    ``vocab_pad`` adds embedding rows past the tokenizer (like Llama-2's 32000 vs 32001)."""
    from proxytune_jax import save_pretrained
    from proxytune_jax.models import config_from_hf, init_model

    vocab = len(tokenizer) + vocab_pad
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if model_type == "gpt2":
        hf = dict(model_type="gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                  n_positions=max_positions, **ids)
    else:
        hf = dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False, **ids)
    model = init_model(config_from_hf(hf), seed=seed)
    save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_task_examples(task: str, path: str, *, max_examples: int | None = None,
                       system_prompt: str | None = None) -> list:
    """``proxytune_jax.data.load_task`` with each loader's own knobs (ToxiGen limits per group; only chat
    tasks take a system prompt)."""
    from proxytune_jax.data import load_task

    kwargs: dict[str, Any] = {}
    if task == "toxigen":
        kwargs["max_examples_per_group"] = max_examples
    else:
        kwargs["max_examples"] = max_examples
    if system_prompt and task in ("alpaca_eval", "truthfulqa", "truthfulqa_mc", "toxigen"):
        kwargs["system_prompt"] = system_prompt
    return load_task(task, path, **kwargs)


SMOKE_GSM = [
    {"question": "Tom has 3 apples and buys 4 more . How many apples does he have ?",
     "answer": "3 + 4 = 7 apples .\n#### 7"},
    {"question": "Ann reads 2 pages a day for 5 days . How many pages ?", "answer": "2 * 5 = 10 .\n#### 10"},
    {"question": "A box holds 6 eggs . How many eggs in 2 boxes ?", "answer": "6 * 2 = 12 .\n#### 12"},
]


def write_smoke_data(root: str) -> dict[str, str]:
    """Tiny files in every dataset's published format under ``root``; -> {dataset: path}, plus "texts" (a
    file listing every text, for the smoke tokenizer)."""
    import pandas as pd

    os.makedirs(root, exist_ok=True)
    paths: dict[str, str] = {}
    texts: list[str] = []
    paths["gsm8k"] = write_jsonl(os.path.join(root, "gsm8k", "test.jsonl"), SMOKE_GSM)
    paths["gsm8k_train"] = write_jsonl(os.path.join(root, "gsm8k", "train.jsonl"), SMOKE_GSM * 4)
    texts += [r["question"] + " " + r["answer"] for r in SMOKE_GSM]
    tqa = os.path.join(root, "truthfulqa", "TruthfulQA.csv")
    os.makedirs(os.path.dirname(tqa), exist_ok=True)
    pd.DataFrame([
        {"Type": "Adversarial", "Category": "Misconceptions", "Question": "What happens if you eat seeds ?",
         "Best Answer": "Nothing happens", "Correct Answers": "Nothing happens; You digest them",
         "Incorrect Answers": "You grow a tree; You get sick", "Source": "s"},
        {"Type": "Adversarial", "Category": "Fiction", "Question": "Are ghosts real ?", "Best Answer": "No",
         "Correct Answers": "No; There is no evidence", "Incorrect Answers": "Yes; Ghosts are real",
         "Source": "s"},
    ]).to_csv(tqa, index=False)
    paths["truthfulqa"] = paths["truthfulqa_mc"] = tqa
    texts += ["What happens if you eat seeds ? Nothing happens You digest them You grow a tree You get sick",
              "Are ghosts real ? No There is no evidence Yes Ghosts are real A. B. C. D."]
    alpaca = os.path.join(root, "alpaca_eval", "alpaca_eval.json")
    os.makedirs(os.path.dirname(alpaca), exist_ok=True)
    rows = [{"instruction": "Name three colors .", "output": "Red , blue and green .",
             "generator": "text_davinci_003", "dataset": "helpful_base"},
            {"instruction": "Say hello in French .", "output": "Bonjour .", "generator": "text_davinci_003",
             "dataset": "koala"}]
    with open(alpaca, "w") as f:
        json.dump(rows, f)
    paths["alpaca_eval"] = alpaca
    texts += [r["instruction"] + " " + r["output"] for r in rows]
    tox = os.path.join(root, "toxigen", "prompts")
    os.makedirs(tox, exist_ok=True)
    with open(os.path.join(tox, "neutral_women_1k.txt"), "w") as f:
        f.write("- women are scientists\\n- women lead teams\\n-\n")
    paths["toxigen"] = tox
    texts += ["- women are scientists - women lead teams - Complete the following :"]
    paths["triviaqa"] = write_jsonl(os.path.join(root, "triviaqa", "dev.jsonl"), [
        {"question": "What is the capital of France ?", "answers": ["Paris"]},
        {"question": "Which planet is largest ?", "answers": ["Jupiter"]}])
    texts += ["What is the capital of France ? Paris Which planet is largest ? Jupiter"]
    paths["humaneval"] = write_jsonl(os.path.join(root, "humaneval", "HumanEval.jsonl"), [
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a plus b.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}])
    texts += ["def add ( a , b ) : return a + b \"\"\" Return a plus b . \"\"\""]
    cnn = os.path.join(root, "cnn_dailymail", "3.0.0", "test-00000-of-00001.parquet")
    os.makedirs(os.path.dirname(cnn), exist_ok=True)
    arts = [("The city opened a new park on Monday . Families came to play .", "City opens new park .\nFamilies visit ."),
            ("The team won the final game . Fans cheered all night .", "Team wins final .\nFans cheer .")]
    pd.DataFrame([{"article": a, "highlights": h, "id": f"c{i}"} for i, (a, h) in enumerate(arts)]).to_parquet(cnn)
    paths["cnn_dailymail"] = os.path.dirname(os.path.dirname(cnn))
    texts += [a + " " + h for a, h in arts]
    glue_dir = os.path.join(root, "glue", "sst2")
    os.makedirs(glue_dir, exist_ok=True)
    sents = [("a fine and warm film", 1), ("dull and slow", 0), ("great fun", 1), ("a boring mess", 0)]
    for split, reps in (("train", 4), ("validation", 1)):
        pd.DataFrame([{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate(sents * reps)]).to_parquet(
            os.path.join(glue_dir, f"{split}-00000-of-00001.parquet"))
    paths["glue"] = os.path.dirname(glue_dir)
    texts += [s for s, _ in sents] + ["Sentence : Question : Is the sentiment of this sentence positive or "
                                      "negative ? Answer : positive negative"]
    boolq = os.path.join(root, "super_glue", "boolq", "val.jsonl")
    bq = [("is the sky blue", "The sky is blue on a clear day .", True),
          ("is fire cold", "Fire is hot .", False)]
    write_jsonl(boolq, [{"question": q, "passage": p, "label": y, "idx": i} for i, (q, p, y) in enumerate(bq)])
    paths["boolq"] = boolq
    texts += [f"Passage : {p} Question : {q} ? Answer : yes no" for q, p, _ in bq]
    paths["texts"] = os.path.join(root, "texts.json")
    with open(paths["texts"], "w") as f:
        json.dump(texts, f)
    return paths


def smoke_setup(root: str, *, kinds: Sequence[tuple[str, str, int, int]] = ()) -> tuple[dict, Any]:
    """Tiny data + tokenizer + checkpoints under ``root``. ``kinds``: (name, model_type, hidden, seed)."""
    paths = write_smoke_data(os.path.join(root, "data"))
    with open(paths["texts"]) as f:
        tok = smoke_tokenizer(json.load(f), os.path.join(root, "tokenizer"))
    for name, model_type, hidden, seed in kinds:
        paths[name] = smoke_checkpoint(os.path.join(root, "models", name), tok, model_type=model_type,
                                       hidden=hidden, seed=seed)
    return paths, tok


def smoke_train(*, max_length: int = 128):
    """The ``TrainConfig`` template of the ``--smoke`` runs: 2 steps of 2 rows on one device, checkpoint and
    log at every step (``student``, ``train_file`` and the objective are filled in by :func:`run_config`)."""
    from proxytune_jax.sharding import MeshConfig
    from proxytune_jax.training import CheckpointConfig, DataConfig, OptimConfig, TrainConfig

    return TrainConfig(data=DataConfig(max_length=max_length, batch_size=2),
                       optim=OptimConfig(learning_rate=1e-3), mesh=MeshConfig(data=1),
                       checkpoint=CheckpointConfig(save_every=2), steps=2, log_every=1)


def run_config(template, *, student: str, train_file: str, objective=None, seed: int | None = None,
               eval_file: str | None = None):
    """``template`` (a ``TrainConfig`` holding an experiment's shared settings: data sizes, optimizer, mesh,
    checkpoints) completed for one run: the model to train, its data and, when given, its objective and seed."""
    changes: dict[str, Any] = {
        "model": dataclasses.replace(template.model, student=student),
        "data": dataclasses.replace(template.data, train_file=train_file,
                                    **({} if eval_file is None else {"eval_file": eval_file}))}
    if objective is not None:
        changes["objective"] = objective
    if seed is not None:
        changes["seed"] = seed
    return dataclasses.replace(template, **changes)


def train_run(config, run_dir: str):
    """``proxytune_jax.training.train(config, run_dir/workdir)``: the same run as ``proxytune train``, resumable
    (rerunning continues from the last checkpoint). Returns its ``TrainResult``; its ``export_dir`` is the
    trained model as a Hugging Face folder."""
    from proxytune_jax.errors import UserError
    from proxytune_jax.training import train

    workdir = os.path.join(run_dir, "workdir")
    result = train(config, workdir, progress=False)
    if result.export_dir is None or not os.path.isdir(result.export_dir):
        raise UserError(f"training in {workdir} exported no model (config.export is {config.export})")
    return result


def token_calibration(model_path: str, data_file: str, *, max_length: int, batch_size: int = 8,
                      dtype: str = "float32") -> dict:
    """Response-token NLL, top-1 accuracy and ECE (10 and 15 bins) of a checkpoint on a prompt/response JSONL
    file (teacher forcing, ``training.data`` tokenization); also returns the raw (confidence, correct) arrays
    under ``"_curve"`` for a reliability diagram."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from proxytune_jax import load_pretrained
    from proxytune_jax.eval.calibration import expected_calibration_error, top1_confidence_and_correct
    from proxytune_jax.training.data import load_batches
    from proxytune_jax.training.objectives import shifted
    from proxytune_jax.training.state import split_params
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    graphdef, params = split_params(load_pretrained(model_path, dtype=getattr(jnp, dtype)))
    batches = load_batches(data_file, tok, batch_size=batch_size, max_length=max_length, shuffle=False)

    @jax.jit
    def forward(params, ids, attn):
        logits, _ = nnx.merge(graphdef, params)(ids, attn)
        return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)

    confs, corrects, nll, n = [], [], 0.0, 0
    for b in batches.epoch_batches():
        logp = np.asarray(forward(params, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])))
        labels, mask = (np.asarray(x) for x in shifted({k: jnp.asarray(v) for k, v in b.items()}))
        picked = np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        nll += float(-(picked * mask).sum())
        n += int(mask.sum())
        c, k = top1_confidence_and_correct(logp, labels, mask)
        confs.append(c)
        corrects.append(k)
    conf, corr = np.concatenate(confs), np.concatenate(corrects)
    return {"nll": nll / max(n, 1), "accuracy": float(corr.mean()) if n else float("nan"),
            "ece10": expected_calibration_error(conf, corr, 10), "ece15": expected_calibration_error(conf, corr, 15),
            "tokens": n, "_curve": (conf, corr)}


# ------------------------------------------------------------------------------------------- classification
def encode_classification(examples, tokenizer, max_length: int) -> dict:
    """Left-padded prompts (keeping the end of an over-long prompt: the question and "Answer:")."""
    from proxytune_jax.decoding.prompts import left_pad

    seqs = [list(tokenizer(ex.prompt)["input_ids"])[-max_length:] for ex in examples]
    ids, mask = left_pad(seqs, max_length, tokenizer.pad_token_id or 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray([ex.reference for ex in examples], np.int32)}


def class_logits(graphdef, params, batch, verbalizer_ids):
    """[B, C] float32: the last position's logits at the label words' token ids (h @ W[ids].T in fp32)."""
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, params)
    h, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, D]
    w = model.lm_head_weight()[jnp.asarray(verbalizer_ids)]  # [C, D]
    return h[:, -1, :].astype(jnp.float32) @ w.astype(jnp.float32).T


def predict_class_logits(graphdef, params, data: dict, verbalizer_ids, batch_size: int) -> np.ndarray:
    """Class logits [N, C] of every row of ``data`` (encode_classification output), in batches."""
    import jax

    fn = jax.jit(lambda p, b: class_logits(graphdef, p, b, verbalizer_ids))
    out = []
    for i in range(0, len(data["labels"]), batch_size):
        b = {k: v[i:i + batch_size] for k, v in data.items() if k != "labels"}
        out.append(np.asarray(fn(params, b)))
    return np.concatenate(out)


def script_entry(main) -> int:
    """Run a script's ``main()``; a UserError (a fixable mistake: missing file, bad --set) prints one line and
    exits with status 2, like the ``proxytune`` CLI."""
    from proxytune_jax.errors import UserError

    try:
        main()
    except UserError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2
    return 0
