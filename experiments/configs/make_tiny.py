"""Make the tiny models and data the *_tiny.py configs train on (CPU, about a minute).

    python experiments/configs/make_tiny.py [OUT_DIR=runs/tiny] [--teacher-steps 300]

Writes OUT_DIR/{tokenizer,teacher,student}/ (Hugging Face folders, one shared byte-level BPE tokenizer),
OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl (prompt/response arithmetic: "question: what is 3 plus 4?" ->
" answer: 7"), and the teacher's top-k caches OUT_DIR/topk_{train,eval}/ for offline distillation. The
teacher (hidden 64) is first fine-tuned on train.jsonl with the SFT objective so it has something to teach;
the student (hidden 32) stays random.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def make_tokenizer(corpus: list[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")


def arithmetic(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op, val = rng.choice([("plus", a + b), ("times", a * b)])
        out.append({"prompt": f"question: what is {a} {op} {b}?", "response": f" answer: {val}"})
    return out


def llama_config(vocab: int, hidden: int, layers: int):
    """A tiny Llama (4 query heads over 2 kv heads, MLP 2 x hidden, untied, 64 positions)."""
    from proxytune_jax.models import small_llama_config

    return small_llama_config(vocab, hidden, layers, 4, num_kv_heads=2, max_positions=64, rms_norm_eps=1e-5,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/tiny")
    parser.add_argument("--teacher-steps", type=int, default=300)
    args = parser.parse_args(argv)

    from proxytune_jax import save_pretrained
    from proxytune_jax.models import init_model
    from proxytune_jax.training import (SFT, CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig,
                                        train)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = arithmetic(512, 0), arithmetic(64, 1)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = make_tokenizer([r["prompt"] + r["response"] for r in train_rows] * 4)
    tokenizer.save_pretrained(out / "tokenizer")
    vocab = len(tokenizer)
    for name, hidden, seed in (("teacher_init", 64, 0), ("student", 32, 1)):
        model = init_model(llama_config(vocab, hidden, 2), seed=seed)
        save_pretrained(model, out / name)
        tokenizer.save_pretrained(out / name)
    if args.teacher_steps > 0:
        cfg = TrainConfig(model=ModelConfig(student=str(out / "teacher_init")), objective=SFT(),
                          data=DataConfig(train_file=str(out / "train.jsonl"), eval_file=str(out / "eval.jsonl"),
                                          max_length=32, batch_size=16),
                          steps=args.teacher_steps,
                          optim=OptimConfig(learning_rate=3e-3, warmup_steps=min(20, args.teacher_steps // 2)),
                          checkpoint=CheckpointConfig(save_every=10**9), log_every=50)
        result = train(cfg, out / "teacher_run")
        shutil.rmtree(out / "teacher", ignore_errors=True)
        shutil.copytree(result.export_dir, out / "teacher")
        print(f"teacher SFT: eval {result.eval_metrics}")
    else:
        shutil.copytree(out / "teacher_init", out / "teacher", dirs_exist_ok=True)
    from proxytune_jax.training.topk_cache import build_topk_cache
    for name in ("train", "eval"):  # offline FIRST caches of the teacher (first_tiny.py)
        shutil.rmtree(out / f"topk_{name}", ignore_errors=True)
        build_topk_cache(out / "teacher", out / f"{name}.jsonl", out / f"topk_{name}", k=5)
    print(f"wrote {out}/{{teacher,student,tokenizer,train.jsonl,eval.jsonl,topk_train,topk_eval}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
