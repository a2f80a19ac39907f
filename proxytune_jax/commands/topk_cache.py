"""`proxytune topk-cache`: write a teacher's top-k cache for ``offline_topk`` (FIRST) training.

Two sources:

- a local teacher (``--teacher DIR --data FILE``): the teacher's top-k at every position of every example
  of the training file (``training.topk_cache.build_topk_cache``);
- a black-box teacher (``--responses FILE --tokenizer DIR``): recorded OpenAI-style responses with
  ``top_logprobs``; writes the training file of the generated texts next to the cache
  (``training.recorded_teacher.build_api_topk_cache``).
"""
from __future__ import annotations

from pathlib import Path

from proxytune_jax.errors import UserError


def add_arguments(parser):
    parser.add_argument("--out", required=True, type=Path, help="the cache folder (must not hold a cache yet)")
    parser.add_argument("--k", type=int, default=5, help="entries per position (default 5; APIs give at most 20)")
    local = parser.add_argument_group("a local teacher")
    local.add_argument("--teacher", default=None, help="Hugging Face folder or Hub id of the teacher")
    local.add_argument("--data", type=Path, default=None, help="the JSONL training file to score")
    local.add_argument("--batch-size", type=int, default=8)
    api = parser.add_argument_group("a black-box teacher (recorded API responses)")
    api.add_argument("--responses", type=Path, default=None,
                     help='JSONL of {"prompt": ..., "response": <the server\'s JSON with logprobs>}')
    api.add_argument("--tokenizer", default=None, help="the teacher's tokenizer (shared with the student)")
    api.add_argument("--data-out", type=Path, default=None,
                     help="the training file written (default <out>/train.jsonl)")


def run(args) -> int:
    if (args.teacher is None) == (args.responses is None):
        raise UserError("pass either --teacher and --data (a local teacher) or --responses and --tokenizer "
                        "(recorded API responses)")
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.teacher is not None:
        if args.data is None:
            raise UserError("--teacher needs --data (the training file to score)")
        from proxytune_jax.training.topk_cache import build_topk_cache
        out = build_topk_cache(args.teacher, args.data, args.out, k=args.k, batch_size=args.batch_size)
        print(f"wrote {out}")
        return 0
    if args.tokenizer is None:
        raise UserError("--responses needs --tokenizer (the teacher's tokenizer, shared with the student)")
    from transformers import AutoTokenizer

    from proxytune_jax.models.hub import resolve_model_path
    from proxytune_jax.training.recorded_teacher import build_api_topk_cache
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer, what="tokenizer"))
    cache, data = build_api_topk_cache(args.responses, tok, args.out, k=args.k, data_out=args.data_out)
    print(f"wrote {cache} and the training file {data}")
    return 0
