"""``proxytune train --config FILE.py [--set key=value ...] --workdir DIR``: SFT and distillation runs.

The config file defines ``config = TrainConfig(...)`` (``proxytune_jax.training.config``); see
``experiments/configs/`` for examples. Rerunning the same command resumes from the last complete checkpoint.
Outputs in DIR: config.json, metrics.jsonl, checkpoints/, final/ (a Hugging Face folder; with
``--set model.lora.r=8`` (or ``model=ModelConfig(..., lora=LoraConfig(...))``) only a LoRA adapter is trained
and final/ is a PEFT adapter folder).
Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I on every host (or nothing on a TPU
pod / SLURM cluster where JAX detects them) and the same config and workdir.
On a multi-core CPU, ``--cpu-devices N`` splits the cores into N JAX devices and each batch over them (data
parallel, as on N GPUs); with ``--set steps_per_call=4`` the loop runs 4 steps per jitted call. Both are
measured in ``experiments/benchmarks/train.py``. Config values are typed and nested (``--set optim.learning_rate=1e-3``);
a config file may define and register its own objective (``training.register_objective``).
"""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="Python file defining `config = TrainConfig(...)`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path (repeatable), e.g. --set steps=200 "
                             "--set objective.loss=reverse_kl --set optim.learning_rate=1e-3")
    parser.add_argument("--workdir", required=True, help="run directory (created; rerun to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report-to", default=None, metavar="WRITERS",
                        help="metric writers besides metrics.jsonl, comma-separated: tensorboard (default; event "
                             "files in WORKDIR/tensorboard), wandb (pip install 'proxytune_jax[wandb]'), or none "
                             "(sets report.to)")
    parser.add_argument("--profile", default=None, metavar="STEPS",
                        help="write a jax.profiler trace of steps A:B (e.g. 5:8) or of N steps after the first to "
                             "WORKDIR/profile (sets report.profile)")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="run on N JAX CPU devices carved out of this machine's cores (sets XLA_FLAGS="
                             "--xla_force_host_platform_device_count=N before JAX starts); the mesh's data axis "
                             "then splits each batch over them, which on a multi-core CPU is faster than one "
                             "device (batch_size must be divisible by N)")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator address HOST:PORT")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")


def use_cpu_devices(n: int) -> None:
    """Make JAX's CPU backend expose ``n`` devices. Must run before the backend starts."""
    import os
    import re
    import sys
    from proxytune_jax.errors import UserError
    if n < 1:
        raise UserError(f"--cpu-devices must be >= 1, got {n}")
    old = os.environ.get("XLA_FLAGS")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", old or "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    if "jax" in sys.modules:  # started already? its CPU backend shows whether the flag took effect
        import jax
        if len(jax.devices("cpu")) != n:
            if old is None:
                os.environ.pop("XLA_FLAGS")
            else:
                os.environ["XLA_FLAGS"] = old
            raise UserError("--cpu-devices must be applied before JAX starts its backends; pass it to a fresh "
                            "`proxytune train` process (or set XLA_FLAGS yourself)")


def report_overrides(args) -> list[str]:
    """``--report-to`` / ``--profile`` as ``--set`` overrides of the config's ``report`` fields."""
    import json
    out = []
    if args.report_to is not None:
        names = [n.strip() for n in args.report_to.split(",") if n.strip()]
        out.append(f"report.to={json.dumps(names)}")
    if args.profile is not None:
        out.append(f"report.profile={args.profile}")
    return out


def run(args) -> int:
    if args.cpu_devices:
        use_cpu_devices(args.cpu_devices)
    if args.coordinator or args.num_processes:
        from proxytune_jax.sharding import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from proxytune_jax.training.config import load_config
    from proxytune_jax.training.loop import train

    config = load_config(args.config, args.overrides + report_overrides(args))
    result = train(config, args.workdir, progress=not args.no_progress)
    summary = {k: round(v, 6) for k, v in result.last_metrics.items() if isinstance(v, float)}
    print(f"proxytune train: step {result.final_step}/{config.steps} in {args.workdir}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""))
    if summary:
        print("  last logged: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if result.eval_metrics:
        print("  eval: " + ", ".join(f"{k}={v:.6g}" for k, v in result.eval_metrics.items()))
    if result.gen_eval_metrics:
        print("  gen eval: " + ", ".join(f"{k}={v:.6g}" for k, v in result.gen_eval_metrics.items()))
    if result.export_dir is not None and config.model.lora is not None:
        print(f"  exported the LoRA adapter as a PEFT folder: {result.export_dir} (base: {config.model.student}; "
              f"use it with `proxytune generate --expert {config.model.student} --expert-adapter "
              f"{result.export_dir}`)")
    elif result.export_dir is not None:
        print(f"  exported Hugging Face folder: {result.export_dir}")
    return 0
