"""``proxytune train --config FILE.py [--set key=value ...] --workdir DIR``: SFT and distillation runs.

The config file defines ``config = TrainConfig(...)`` (``proxytune_jax.training.config``); see
``experiments/configs/`` for examples. Rerunning the same command resumes from the last complete checkpoint.
Outputs in DIR: config.json, metrics.jsonl, checkpoints/, final/ (a Hugging Face folder).
Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I on every host (or nothing on a TPU
pod / SLURM cluster where JAX detects them) and the same config and workdir.
"""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="Python file defining `config = TrainConfig(...)`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set steps=200 --set loss=reverse_kl")
    parser.add_argument("--workdir", required=True, help="run directory (created; rerun to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator address HOST:PORT")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")


def run(args) -> int:
    if args.coordinator or args.num_processes:
        from proxytune_jax.sharding import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from proxytune_jax.training.config import load_config
    from proxytune_jax.training.loop import train

    config = load_config(args.config, args.overrides)
    result = train(config, args.workdir, progress=not args.no_progress)
    summary = {k: round(v, 6) for k, v in result.last_metrics.items() if isinstance(v, float)}
    print(f"proxytune train: step {result.final_step}/{config.steps} in {args.workdir}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""))
    if summary:
        print("  last logged: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if result.eval_metrics:
        print("  eval: " + ", ".join(f"{k}={v:.6g}" for k, v in result.eval_metrics.items()))
    if result.export_dir is not None:
        print(f"  exported Hugging Face folder: {result.export_dir}")
    return 0
