"""``train(config, workdir)``: the whole run behind ``proxytune train``.

Workdir layout:
  ``config.json``     the run's ``TrainConfig`` (a rerun with the same workdir must match it, see
                      ``config.RESUMABLE_CHANGES``);
  ``metrics.jsonl``   one line per logged step: ``step``, every loss term, ``learning_rate``, ``grad_norm``,
                      ``tokens``, ``tokens_per_s`` (real tokens of the batches since the last log / wall time);
                      evaluation lines carry ``eval_*`` keys, generation-based evaluation lines
                      ``gen_eval_*`` keys (``training.gen_eval``; its answers in ``gen_eval/``);
  ``tensorboard/``    the same numbers as TensorBoard event files (``report.to``, ``training.reporting``; or a
                      W&B run); ``run_info.json``: config, git commit, package versions, devices;
  ``profile/``        a ``jax.profiler`` trace of the steps of ``report.profile`` (``training.profiling``);
  ``checkpoints/``    orbax steps (``proxytune_jax.checkpoint``), every ``save_every`` steps and at the end;
  ``final/``          the trained params as a Hugging Face folder (+ tokenizer), when ``export``; with
                      ``model.lora`` the adapter as a PEFT folder (``adapter_config.json`` +
                      ``adapter_model.safetensors`` + tokenizer; ``training.lora``).

Several optimizer steps per jitted call (``steps_per_call``, ``training.step.make_multi_step``): calls are cut
at every checkpoint, evaluation and the last step (``trainer.call_length``), so those see the state of their own
step; a logged step inside a call gets its metrics from the stacked ones and an even share of the call's time.

Rerunning the same command resumes from the last complete checkpoint: the state (params, optimizer, step,
PRNG key) is restored onto the current mesh, the data continue at the saved position, and metrics lines
written after that checkpoint by the killed run are dropped. Only process 0 writes files other than
checkpoints in a multi-host run.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from proxytune_jax.checkpoint import Checkpointer
from proxytune_jax.errors import UserError
from proxytune_jax.jsonl import read_json_file
from proxytune_jax.atomic import write_json_atomic, write_text_atomic
from proxytune_jax.sharding import (make_mesh, put_global, put_global_batch, put_stacked_batches, replicated,
                                    to_host, tree_shardings)
from proxytune_jax.training.config import TrainConfig, check_resume_compatible
from proxytune_jax.training.data import Batches, load_batches
from proxytune_jax.training.gen_eval import GenerationEval
from proxytune_jax.training.objectives import DataContext
from proxytune_jax.training.optim import learning_rate_schedule, make_optimizer
from proxytune_jax.training.profiling import StepProfiler
from proxytune_jax.training.reporting import Reporter, run_info
from proxytune_jax.training.state import abstract_train_state, init_train_state, split_params
from proxytune_jax.training.step import make_eval_step, make_multi_step, make_train_step, mean_metrics
from proxytune_jax.training.trainer import run_steps

_HOST_ONLY_KEYS = ("token_index",)  # batch entries used on the host (cache alignment), not by the step


@dataclasses.dataclass
class TrainResult:
    final_step: int
    resumed_from: int | None
    workdir: Path
    export_dir: Path | None
    last_metrics: dict
    eval_metrics: dict
    state: Any = None  # the final TrainState (on device)
    gen_eval_metrics: dict = dataclasses.field(default_factory=dict)  # the last generation-based evaluation


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _load_model(path: str | Path, dtype, what: str):
    """A model from a local folder or a Hub id (``models.hub.resolve_model_path``; a local folder wins)."""
    from proxytune_jax.models.hf_io import load_pretrained
    from proxytune_jax.models.hub import resolve_model_path
    return load_pretrained(resolve_model_path(path, what=what), dtype=dtype)


def _last_eval(path: Path, step: int, prefix: str = "eval_") -> dict:
    lines = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    evals = [l for l in lines if l.get("step") == step and any(k.startswith(prefix) for k in l)]
    return {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}


def _check_same_tokenizer(tokenizer, path: str, role: str, student_path: str) -> None:
    """A frozen model's folder with a tokenizer must tokenize like the student's: the objectives compare
    distributions id by id, so two vocabularies of the same size but other tokens would be silently wrong."""
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return  # no tokenizer saved with the model: the user vouches for it
    from transformers import AutoTokenizer
    other = AutoTokenizer.from_pretrained(path)
    if other.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"the {role} {path} has another tokenizer than the student ({student_path}); distillation "
                        "here compares distributions token id by token id, so both must share one tokenizer")


def _truncate_metrics(path: Path, upto_step: int) -> int:
    """Keep metrics lines with ``step <= upto_step`` (a killed run may have logged past its last
    checkpoint, or died mid-line). Returns the number of dropped lines."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if obj.get("step", 0) <= upto_step:
            kept.append(line)
        else:
            dropped += 1
    write_text_atomic(path, "".join(l + "\n" for l in kept))
    return dropped


class _BatchSource:
    """Host batches for a step, with per-objective additions (teacher top-k cache, n-gram prior)."""

    def __init__(self, batches: Batches, attach: Callable[[dict], dict] | None = None):
        self.batches, self.attach = batches, attach

    def host(self, step: int) -> dict:
        b = self.batches.batch(step)
        return self.attach(b) if self.attach else b

    def host_eval(self):
        for b in self.batches.epoch_batches():
            yield self.attach(b) if self.attach else b


def _device_batch(batch: dict, mesh) -> dict:
    return put_global_batch({k: v for k, v in batch.items() if k not in _HOST_ONLY_KEYS}, mesh)


def _device_batches(batches: list[dict], mesh) -> dict:
    return put_stacked_batches([{k: v for k, v in b.items() if k not in _HOST_ONLY_KEYS} for b in batches], mesh)


def train(config: TrainConfig, workdir: str | Path, *, mesh=None, progress: bool = True,
          on_step: Callable[[int, dict | None, Checkpointer], None] | None = None,
          return_state: bool = False) -> TrainResult:
    """Run (or resume) the training described by ``config`` in ``workdir``; see the module docstring.

    ``on_step(step, metrics_or_None, checkpointer)`` is called after every optimizer step (metrics only on
    logged steps) -- a hook for tests and notebooks. With ``steps_per_call = k > 1`` the hook runs for each
    of a call's k steps once that call has finished.
    """
    config.validate()
    objective = config.objective.bind_run(config.steps)
    objective.validate()
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    config_file, metrics_file = workdir / "config.json", workdir / "metrics.jsonl"
    if config_file.exists():
        changed = check_resume_compatible(read_json_file(
            config_file, what="the work dir's config", fix="use a new --workdir (the checkpoints there can be "
            "moved to it)"), config, workdir)
        if changed and primary:
            print(f"[train] resuming {workdir} with changed {', '.join(changed)}")

    # Model paths may be Hub ids: each is resolved once to a local folder (the HF cache's snapshot).
    from transformers import AutoTokenizer

    from proxytune_jax.models.hub import resolve_model_path
    student_dir = resolve_model_path(config.model.student, what="student")
    tokenizer_dir = (resolve_model_path(config.model.tokenizer, what="tokenizer") if config.model.tokenizer
                     else student_dir)
    frozen_dirs = {role: resolve_model_path(path, what=role) for role, path in objective.frozen_models().items()}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    mesh = mesh or make_mesh(config.mesh)
    if primary and progress:
        print(f"[train] mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s), "
              f"{config.steps_per_call} step(s) per call")
    d = config.data
    data_kwargs = dict(batch_size=d.batch_size, max_length=d.max_length, pack=d.pack)
    train_data = load_batches(d.train_file, tokenizer, seed=config.seed, shuffle=d.shuffle, **data_kwargs)
    eval_data = (load_batches(d.eval_file, tokenizer, seed=config.seed, shuffle=False,
                              **{**data_kwargs, "pack": False})  # every eval example whole, in file order
                 if d.eval_file else None)

    # A row's first token is never scored (no position predicts it); unpacked rows are cut at max_length.
    end = None if d.pack else d.max_length
    if not any(int(np.sum(e.loss_mask[1:end])) for e in train_data.examples):
        raise UserError(f"{d.train_file} has no target tokens within data.max_length={d.max_length}: every "
                        "response is empty or cut off; give records with a non-empty \"response\" (or \"text\"), "
                        "or raise data.max_length")
    for role, path in frozen_dirs.items():
        _check_same_tokenizer(tokenizer, path, role, config.model.tokenizer or config.model.student)
    # The inputs are readable and consistent: only now does the work dir get its first file.
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_file, config.to_dict())

    from proxytune_jax.models import partition_rules
    student = _load_model(student_dir, _dtype(config.model.param_dtype), "student")
    if config.model.remat != "none":  # a static field of the graphdef: the student's blocks are checkpointed
        student.config = dataclasses.replace(student.config, remat=config.model.remat)
    compute_dtype = _dtype(config.model.compute_dtype) if config.model.compute_dtype else None
    graphdef, params = split_params(student)
    rules = partition_rules(student.config)
    student_config = student.config
    del student
    gen_eval = (GenerationEval(config.gen_eval, d, tokenizer, student_config, workdir, mesh, write=primary)
                if config.gen_eval.every else None)

    frozen, frozen_graphdefs = {}, {}
    lora_cfg = config.model.lora
    if lora_cfg is not None:  # train an adapter; the base params become a frozen input (training.lora)
        from proxytune_jax.models import lora
        from proxytune_jax.training.lora import BASE_ROLE
        base = params
        params = lora.init_lora(base, lora_cfg, jax.random.PRNGKey(config.seed))
        frozen[BASE_ROLE] = put_global(base, tree_shardings(base, rules, mesh))
        if primary:
            print(f"[train] LoRA r={lora_cfg.r} alpha={lora_cfg.alpha}: {lora.num_params(params):,} trainable "
                  f"params in {len(lora.adapter_leaves(params))} modules ({lora.num_params(base):,} frozen)")
        del base
    for role, path in frozen_dirs.items():
        model = _load_model(path, jnp.float32, role)
        fg, fp = split_params(model)
        frozen[role] = put_global(fp, tree_shardings(fp, partition_rules(model.config), mesh))
        frozen_graphdefs[role] = fg

    train_src = _BatchSource(train_data, objective.attach(
        DataContext("train", d.train_file, train_data.examples, tokenizer)))
    eval_src = (_BatchSource(eval_data, objective.attach(
        DataContext("eval", d.eval_file, eval_data.examples, tokenizer))) if eval_data else None)

    oc = config.optim_config()
    optimizer = make_optimizer(oc)
    schedule = learning_rate_schedule(oc)
    extras = objective.init_state()
    abstract = abstract_train_state(jax.eval_shape(lambda p: p, params), optimizer, rules=rules, mesh=mesh,
                                    extras=extras)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)

    ckpt = Checkpointer(workdir / "checkpoints", save_every=config.checkpoint.save_every,
                        keep=config.checkpoint.keep)
    restored = ckpt.restore_latest(abstract)
    resumed_from = None
    if restored is not None:
        state, meta, start = restored
        resumed_from = start
        want = train_data.position(start).to_dict()
        if meta.get("data_position") != want or meta.get("num_examples") != len(train_data.examples):
            raise UserError(f"checkpoint step {start} was saved at data position {meta.get('data_position')} "
                            f"of {meta.get('num_examples')} examples, but this run's data give {want} of "
                            f"{len(train_data.examples)}; resume with the same train_file and batch settings")
        del params
        if primary:
            dropped = _truncate_metrics(metrics_file, start)
            print(f"[train] resumed from step {start} ({workdir / 'checkpoints'})"
                  + (f"; dropped {dropped} metrics lines logged after it" if dropped else ""))
    else:
        state = init_train_state(params, optimizer, rules=rules, mesh=mesh, seed=config.seed, extras=extras)
        del params
        start = 0
        if primary and metrics_file.exists():
            metrics_file.unlink()  # no checkpoint: the run starts over

    loss_fn = objective.loss_fn(graphdef, frozen_graphdefs)
    generate = objective.make_generate(graphdef, frozen_graphdefs)
    if lora_cfg is not None:
        from proxytune_jax.training.lora import wrap_generate, wrap_loss_fn
        loss_fn, generate = wrap_loss_fn(loss_fn, lora_cfg), wrap_generate(generate, lora_cfg)
    train_step = make_train_step(loss_fn, optimizer, mesh, state_shardings=shardings, frozen=frozen,
                                 grad_accum_steps=config.grad_accum_steps, learning_rate_fn=schedule,
                                 update_extras=objective.update_state, generate=generate,
                                 compute_dtype=compute_dtype)
    multi_step = make_multi_step(train_step) if config.steps_per_call > 1 else None
    eval_step = (make_eval_step(loss_fn, mesh, params_shardings=shardings.params, frozen=frozen, seed=config.seed,
                                state=extras, compute_dtype=compute_dtype) if eval_src else None)

    reporter = Reporter(workdir, config.report, resumed_from=resumed_from, enabled=primary)
    profiler = StepProfiler(config.report.profile, workdir / "profile", start=start, enabled=primary)
    try:
        reporter.log_run_info(run_info(config.to_dict(), resumed_from=resumed_from))
        return _run(config=config, workdir=workdir, metrics_file=metrics_file, tokenizer=tokenizer, mesh=mesh,
                    train_data=train_data, eval_src=eval_src, train_src=train_src, graphdef=graphdef, state=state,
                    start=start, resumed_from=resumed_from, ckpt=ckpt, train_step=train_step,
                    multi_step=multi_step, eval_step=eval_step, gen_eval=gen_eval, reporter=reporter,
                    profiler=profiler, on_step=on_step, progress=progress, primary=primary,
                    return_state=return_state, lora_cfg=lora_cfg, student_config=student_config,
                    lora_base=frozen.get(BASE_ROLE) if lora_cfg is not None else None)
    finally:
        profiler.stop()
        reporter.close()


def _run(*, config, workdir, primary, metrics_file, tokenizer, mesh, train_data, eval_src, train_src, graphdef,
         state, start, resumed_from, ckpt, train_step, multi_step, eval_step, gen_eval, reporter, profiler, on_step,
         progress, return_state, lora_cfg, student_config, lora_base):
    """The steps, evaluations and export of ``train`` (its locals, once the state is ready). With LoRA,
    ``state.params`` is the adapter and ``lora_base`` the frozen base params."""
    def meta_for(step: int) -> dict:
        return {"step": step, "data_position": train_data.position(step).to_dict(),
                "num_examples": len(train_data.examples), "config": config.to_dict()}

    def run_eval(state, step: int) -> dict:
        summed = [eval_step(state.params, _device_batch(b, mesh)) for b in eval_src.host_eval()]
        out = {f"eval_{k}": v for k, v in mean_metrics([jax.tree.map(to_host, m) for m in summed]).items()}
        reporter.log(step, out)
        return out

    def run_gen_eval(state, step: int) -> dict:
        if lora_cfg is not None:
            from proxytune_jax.models import lora
            out = gen_eval(graphdef, lora.merge(lora_base, state.params, lora_cfg), step)
        else:
            out = gen_eval(graphdef, state.params, step)
        reporter.log(step, out)
        return out

    log = {"last": {}, "eval": {}, "gen": {}, "t0": time.perf_counter(), "tokens": 0}
    if eval_src and config.eval_every and start == 0:
        log["eval"] = run_eval(state, 0)  # the starting point, for comparison
    if gen_eval and start == 0:
        log["gen"] = run_gen_eval(state, 0)

    def on_call(state, first: int, hosts: list[dict], metrics: dict):
        n = len(hosts)
        t_call_end, host_metrics = None, None
        t_evals = time.perf_counter()
        for j, host in enumerate(hosts):
            step = first + j + 1
            log["tokens"] += int(host["attention_mask"].sum())
            logged = None
            if step % config.log_every == 0 or step == config.steps:
                if host_metrics is None:  # waits for the call; its steps share its time evenly
                    host_metrics = {k: np.reshape(to_host(v), (n,)) for k, v in metrics.items()}
                    t_call_end = time.perf_counter()
                    t_call_start = log.get("t_prev_end", log["t0"])
                now = t_call_start + (j + 1) / n * (t_call_end - t_call_start)
                m = {k: float(v[j]) for k, v in host_metrics.items()}
                logged = {"step": step, **m, "tokens_per_s": log["tokens"] / max(now - log["t0"], 1e-9)}
                log["t0"], log["tokens"], log["last"] = now, 0, logged
                reporter.log(step, {k: v for k, v in logged.items() if k != "step"})
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            if j == n - 1:  # saves and evaluations fall on the last step of a call (trainer.call_length)
                ckpt.save(step, state, meta_for(step), force=(step == config.steps))
                t_evals = time.perf_counter()
                if eval_src and config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    log["eval"] = run_eval(state, step)
                if gen_eval and step % config.gen_eval.every == 0 and step != config.steps:
                    log["gen"] = run_gen_eval(state, step)
            if on_step is not None:
                on_step(step, logged, ckpt)
        paused = time.perf_counter() - t_evals  # evaluations are not training time (tokens_per_s)
        log["t0"] += paused
        log["t_prev_end"] = time.perf_counter() if t_call_end is None else t_call_end + paused
        profiler.after_call(first + n, metrics)
        return state

    def host_batch(s: int) -> dict:  # s: 0-based, the batch of step s + 1
        profiler.before_step(s + 1)
        return train_src.host(s)

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not (progress and primary),
               dynamic_ncols=True)
    cut = (config.checkpoint.save_every, config.eval_every if eval_src else 0, config.gen_eval.every)
    try:
        state = run_steps(state, train_step, multi_step, host_batch,
                          lambda hosts: (_device_batch(hosts[0], mesh) if len(hosts) == 1
                                         else _device_batches(hosts, mesh)),
                          start=start, total=config.steps, steps_per_call=config.steps_per_call, cut_every=cut,
                          on_call=on_call, bar=bar)
        if eval_src and start < config.steps:
            log["eval"] = run_eval(state, config.steps)
        elif eval_src:  # a finished run rerun as it was: its final evaluation is already logged, once
            log["eval"] = _last_eval(metrics_file, config.steps)
        if gen_eval and start < config.steps:
            log["gen"] = run_gen_eval(state, config.steps)
        elif gen_eval:
            log["gen"] = _last_eval(metrics_file, config.steps, "gen_eval_")
    finally:
        bar.close()
        ckpt.close()

    export_dir = None
    if config.export and lora_cfg is not None:
        export_dir = export_adapter(state.params, lora_cfg, lora_base, student_config, workdir / "final",
                                    base_model=config.model.student, tokenizer=tokenizer)
    elif config.export:
        export_dir = export_params(graphdef, state.params, workdir / "final", tokenizer=tokenizer)
    return TrainResult(final_step=config.steps, resumed_from=resumed_from, workdir=workdir, export_dir=export_dir,
                       last_metrics=log["last"], eval_metrics=log["eval"], state=state if return_state else None,
                       gen_eval_metrics=log["gen"])


def export_params(graphdef, params, path: Path, *, tokenizer=None) -> Path | None:
    """Write ``params`` as a Hugging Face folder (``save_pretrained``) on process 0; other processes only
    take part in gathering the (possibly sharded) params."""
    from flax import nnx
    from proxytune_jax.models.hf_io import save_pretrained
    if jax.process_count() > 1:
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        params = jax.jit(lambda p: p, out_shardings=replicated(mesh))(params)
    if jax.process_index() != 0:
        return None
    host = jax.tree.map(to_host, params)
    model = nnx.merge(graphdef, host)
    save_pretrained(model, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def export_adapter(adapter, cfg, base_params, model_config, path: Path, *, base_model: str = "",
                   tokenizer=None) -> Path | None:
    """Write a trained LoRA adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``,
    ``models.peft_io``) on process 0, with the tokenizer; ``base_model`` goes to ``base_model_name_or_path``."""
    from proxytune_jax.models.peft_io import save_adapter
    if jax.process_count() > 1:
        mesh = jax.tree.leaves(adapter)[0].sharding.mesh
        adapter = jax.jit(lambda p: p, out_shardings=replicated(mesh))(adapter)
    if jax.process_index() != 0:
        return None
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
    save_adapter(path, jax.tree.map(to_host, adapter), cfg, shapes, model_config, base_model_name_or_path=base_model)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
