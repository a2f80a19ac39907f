"""``proxytune plot WORKDIR [WORKDIR ...] -o curves.png [--metrics TAG ...]``: train / eval curves of one or
several ``proxytune train`` runs (one line per run: ablations overlay), read from each run's ``metrics.jsonl``
(``training.curves``). Tags as in TensorBoard: ``train/loss``, ``train/grad_norm``, ``eval/loss``,
``gen_eval/accuracy``, ...; default: the train loss, every eval loss term, every gen_eval score."""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("workdirs", nargs="+", type=Path, metavar="WORKDIR", help="run directories to draw")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="PNG to write (curves.png)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="TAG",
                        help="tags to draw, e.g. train/loss eval/loss gen_eval/accuracy (default: the losses and "
                             "gen_eval scores)")


def run(args) -> int:
    from proxytune_jax.training.curves import plot_curves

    drawn = plot_curves(args.workdirs, args.output, args.metrics)
    print(f"proxytune plot: {len(args.workdirs)} run(s), {len(drawn)} panel(s) "
          f"({', '.join(drawn)}) -> {args.output}")
    return 0
