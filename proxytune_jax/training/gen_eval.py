"""Generation-based evaluation during training (``TrainConfig.gen_eval``, ``GenEvalConfig``).

What a researcher watches is the task score of generated answers, not only held-out losses. Every
``gen_eval.every`` steps (and at step 0 of a fresh run and at the last step) the current params decode greedy
answers for a fixed prompt set with the library's decoder (``decoding.TextGenerator``, rule ``plain``, on the
training mesh), and ``eval.scoring.score`` scores them against the references (GSM-style accuracy, exact
match, ROUGE). The scores are logged like every other metric (``gen_eval_<metric>`` in metrics.jsonl,
``gen_eval/<metric>`` in TensorBoard / W&B); the answers are kept in ``WORKDIR/gen_eval/step_<N>.jsonl``
(``{"prompt", "completion", "reference", "finish_reason"}`` per line, written atomically).

Prompts: ``gen_eval.prompts_file`` (JSONL, ``"prompt"`` plus a reference in ``"answer"``, ``"reference"`` or
``"response"``), else the prompt/response records of ``data.eval_file``; the first ``max_prompts`` of them
(0: all). A prompt is tokenized as training tokenizes a prompt (with the tokenizer's special tokens, no chat
template), so the model continues it as it learned to.
"""
from __future__ import annotations

import json
from pathlib import Path

from proxytune_jax.errors import UserError
from proxytune_jax.atomic import write_text_atomic
from proxytune_jax.jsonl import iter_jsonl

REFERENCE_FIELDS = ("answer", "reference", "response")


def read_prompt_set(path: str | Path, max_prompts: int = 0) -> tuple[list[str], list[str]]:
    """``(prompts, references)`` of a JSONL file of ``{"prompt", "answer" | "reference" | "response"}``."""
    prompts, refs = [], []
    example = '{"prompt": "...", "answer": "..."}'
    for lineno, obj in iter_jsonl(path, what="gen_eval prompts file", example=example):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UserError(f"{path}:{lineno}: a gen_eval prompt needs a \"prompt\" string; write {example}")
        ref = next((obj[k] for k in REFERENCE_FIELDS if k in obj), None)
        if not isinstance(ref, str):
            raise UserError(f"{path}:{lineno}: no reference: give the expected answer as a string in one of "
                            f"{', '.join(REFERENCE_FIELDS)}")
        prompts.append(obj["prompt"])
        refs.append(ref)
        if max_prompts and len(prompts) == max_prompts:
            break
    if not prompts:
        raise UserError(f"{path} holds no prompts for gen_eval; write one {example} per line")
    return prompts, refs


class GenerationEval:
    """``gen(graphdef, params, step) -> {"gen_eval_<metric>": value}`` (and the answers file, when
    ``write``). Prompts are read and tokenized once here, so a too-long prompt fails before training starts."""

    def __init__(self, config, data_config, tokenizer, model_config, workdir: Path, mesh=None, *,
                 write: bool = True):
        from proxytune_jax.decoding.engine import eos_ids_of
        from proxytune_jax.decoding.pipeline import encode_for_models
        from proxytune_jax.sharding import BATCH_AXES

        self.config = config
        self.path = config.prompts_file or data_config.eval_file
        self.prompts, self.references = read_prompt_set(self.path, config.max_prompts)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.outdir = Path(workdir) / "gen_eval"
        self.write = write
        if mesh is not None:
            n = 1
            for a in BATCH_AXES:
                n *= mesh.shape[a]
            if config.batch_size % n:
                raise UserError(f"gen_eval.batch_size {config.batch_size} is not divisible by data x fsdp = {n} "
                                "devices; choose a multiple of it")
        self.encoded = encode_for_models([tokenizer], self.prompts, chat_template=[False],
                                         contexts=[int(model_config.max_position_embeddings)],
                                         names=[f"gen_eval prompt of {self.path}"],
                                         max_new_tokens=config.max_new_tokens)
        eos = set(eos_ids_of(model_config))
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = sorted(eos)

    def decode(self, graphdef, params) -> list:
        """Greedy completions (``decoding.Completion``) of the prompt set by the model ``(graphdef, params)``."""
        from flax import nnx

        from proxytune_jax.decoding.pipeline import TextGenerator
        model = nnx.merge(graphdef, params)
        gen = TextGenerator([model], [self.tokenizer], "plain", eos_ids=self.eos_ids, mesh=self.mesh)
        return gen.generate(self.prompts, max_new_tokens=self.config.max_new_tokens,
                            batch_size=self.config.batch_size, temperature=0.0,
                            stop_strings=tuple(self.config.stop), encoded=self.encoded)

    def __call__(self, graphdef, params, step: int) -> dict[str, float]:
        from proxytune_jax.eval.scoring import score
        completions = self.decode(graphdef, params)
        texts = [c.completion for c in completions]
        scores = score(texts, self.references, self.config.metrics)
        if self.write:
            self.outdir.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"prompt": c.prompt, "completion": c.completion, "reference": r,
                                 "finish_reason": c.finish_reason}) + "\n"
                     for c, r in zip(completions, self.references)]
            write_text_atomic(self.outdir / f"step_{step:06d}.jsonl", "".join(lines))
        return {f"gen_eval_{k}": float(v) for k, v in scores.items() if k != "n"}
