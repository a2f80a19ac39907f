"""The ``proxytune`` console script. Each subcommand lives in ``proxytune_jax/commands/<name>.py`` (``-`` in a
command's name is ``_`` in its module's) and
exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used, so
``proxytune --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help. The module proxytune_jax.commands.<name> implements it.
COMMANDS = {
    "demo": "toy world: proxy-tuning and distillation, trained and evaluated end to end on a CPU",
    "generate": "proxy-tuned (or plain) decoding of local Hugging Face checkpoints, JSONL in and out",
    "train": "SFT and distillation training from a dataclass config, with resumable checkpoints",
    "eval": "score generation outputs against references (accuracy, exact match, ROUGE, ...)",
    "topk-cache": "a teacher's top-k cache for offline distillation: from a local model, or from recorded API "
                  "responses with top_logprobs",
    "plot": "train / eval curves of one or several training runs (ablation overlays) to a PNG",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxytune",
        description="proxytune_jax: decoding-time tuning and distillation in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"proxytune_jax.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserError as err:  # errors a user can fix: one clear line, no traceback
        print(f"proxytune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, an unwritable or read-only folder, a path that vanished
        print(f"proxytune {args.command}: error: {os_error_message(err)}; files written whole are unchanged",
              file=sys.stderr)
        return 2


from proxytune_jax.errors import UserError, os_error_message  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
