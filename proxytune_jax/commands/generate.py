"""``proxytune generate``: proxy-tuned (or plain) decoding of Hugging Face checkpoints, JSONL in and out.

    proxytune generate --target DIR [--expert DIR --anti-expert DIR] [--rule proxy_tuning] [--alpha 1.0]
        [--expert-chat-template] (--prompt TEXT | --prompts FILE.jsonl) --max-new-tokens N [--temperature 0]
        [--top-p 1.0] [--top-k 0] [--seed 0] [--batch-size 8] [--stop STR ...] [--analysis] --output OUT.jsonl
        [--topk-cache DIR [--topk 5]] [--expert-adapter DIR] [--anti-expert-adapter DIR] [--target-adapter DIR]
        [--adapter-mode auto|unmerged|merged] [--alpha-schedule SPEC] [--alpha-gate SPEC] [--placement SPEC]
        [--speculative K [--drafter DIR] [--adaptive-speculative]]
    proxytune generate (--base-api URL --base-model NAME [--base-record FILE] | --base-replay FILE)
        [--base-api-key-env VAR] [--base-topk 20] [--base-tail uniform|drop] [--base-tokenizer DIR]
        --expert DIR --anti-expert DIR ...
    proxytune generate --cross-tokenizer (--target DIR | --base-api ... --base-tokenizer DIR) --expert DIR
        --anti-expert DIR [--temperature T --top-k K --top-p P --seed S] [--batch-size 8] [--stop STR ...] ...

Each DIR is a local folder or a Hugging Face Hub id (``org/name``) resolved through the HF cache (a local folder
wins; ``HF_HUB_OFFLINE=1`` reads the cache only). With only ``--target`` it is plain decoding of that model.
Every fusion rule of :mod:`proxytune_jax.decoding.fusion` is reachable with ``--rule``; the large model is
always ``--target`` and the other roles have their own flags (:func:`role_flag`)::

    --rule proxy_tuning | dexperts   --target BASE --expert TUNED --anti-expert UNTUNED
    --rule eft                       --target BASE (--expert E --anti-expert A)... --param weights=1,0.5
    --rule contrastive               --target EXPERT --amateur SMALL
    --rule small_large_{direct,temperature,low_confidence,kl}   --target LARGE --small SMALL

LoRA: each model flag has an ``-adapter`` twin taking a PEFT LoRA folder (``--expert BASE_SMALL --expert-adapter
DIR``: the usual LoRA-tuned expert). Each base folder is loaded once; an adapter on a base another role also uses
(the expert next to its anti-expert) is applied unmerged, so both share one copy of the base's weights; an adapter
on a base used once is merged into it (a plain model, grouped with same-shaped models). ``--adapter-mode`` forces
either.

Hyperparameters: ``--alpha A`` (the α of proxy_tuning / dexperts) or ``--param NAME=VALUE`` for any rule's
own (``lam``, ``temperature``, ``theta``, ``plausibility``, ``weights`` as a comma list, ...). Per-token α
(:mod:`proxytune_jax.decoding.alpha_control`): ``--alpha-schedule constant|linear:END|step:K:ALPHA2`` and
``--alpha-gate entropy:THRESH|disagreement:THRESH`` (nats; α only where the small pair is uncertain).

Every user mistake is found before anything is written (and before the models are loaded where possible);
the output is written to a temporary file in the output folder and renamed at the end, so a failed run never
leaves a partial file.
Output lines: ``{"prompt", "completion", "token_ids", "finish_reason"}`` (``finish_reason``: "eos", "stop"
for a stop string, "length"); ``--analysis`` adds per-token top-1 ids, chosen-token probabilities of each
model and whether the combined top-1 differs from the target's. ``--topk-cache DIR`` also writes the fused
distribution's top-k before every generated token as a teacher cache (``training.recorded_teacher``) and the
training file of the completions, for ``offline_topk``: the proxy-tuned model distilled offline.

``--speculative K`` (:mod:`proxytune_jax.decoding.speculative`): a drafter (``--drafter DIR`` on the same
tokenizer, default the smallest fused model, e.g. the expert) proposes K tokens per round and the fused models
verify them in one forward each: the same greedy tokens and the same sampling distribution as without it; the
acceptance rate is printed. ``--adaptive-speculative`` adapts K per row.

``--placement base=0-5:fsdp2xtensor3,expert=6,anti_expert=7`` puts each model on its own device group
(:mod:`proxytune_jax.decoding.placement`; the same tokens as without it).

A black-box base (:mod:`proxytune_jax.decoding.blackbox`): ``--base-api URL --base-model NAME`` asks an
OpenAI-compatible completions server for the base's top-k log-probs at every step (``--base-topk``, ≤ 20), the
small pair runs locally; ``--base-record FILE`` keeps every answer and ``--base-replay FILE`` replays them without
a server. ``--base-tail`` says how the tokens outside the top k are treated. ``--base-api-key-env VAR`` sends
the key held in the environment variable ``VAR`` as ``Authorization: Bearer`` (the key itself is never a flag,
never printed and never written to a file).

``--cross-tokenizer`` (:mod:`proxytune_jax.decoding.cross_tokenizer`): the base and the small pair use different
tokenizers, aligned through text; batched (``--batch-size``), greedy or sampled over the fused scores of the
base's candidates (``--temperature`` / ``--top-k`` / ``--top-p`` / ``--seed``), with ``--stop`` strings.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from proxytune_jax.errors import UserError
from proxytune_jax.jsonl import iter_jsonl, read_json_file

ROLE_FLAGS = {"expert": "--expert", "anti_expert": "--anti-expert", "small": "--small", "amateur": "--amateur"}
MODEL_FLAGS = ("--target", "--expert", "--anti-expert", "--small", "--amateur")


def role_flag(rule_name: str, role: str) -> str:
    """The flag giving a rule's model ``role``: the large model (base / large / the contrastive expert) is
    always ``--target``."""
    if role in ("base", "model", "large") or (rule_name == "contrastive" and role == "expert"):
        return "--target"
    return ROLE_FLAGS[role]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None,
                        help="the base (large) model folder or Hub id (required unless the base is a black box: "
                             "--base-api or --base-replay)")
    parser.add_argument("--expert", action="append", default=[],
                        help="the tuned small model folder (repeat with --anti-expert for several pairs, --rule eft)")
    parser.add_argument("--anti-expert", dest="anti_expert", action="append", default=[],
                        help="the untuned small model folder")
    parser.add_argument("--small", help="the small model folder of the small_large_* fusions")
    parser.add_argument("--amateur", help="the amateur (small) model folder of contrastive decoding")
    from proxytune_jax.decoding.fusion import FUSION_RULES
    parser.add_argument("--rule", default=None, choices=sorted(FUSION_RULES),
                        help="fusion rule (default: proxy_tuning with an expert pair, contrastive with --amateur, "
                             "plain with --target alone)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="strength α of the expert/anti-expert offset (default: the rule's, 1.0 for proxy_tuning)")
    parser.add_argument("--alpha-schedule", dest="alpha_schedule", default=None, metavar="SPEC",
                        help="per-token α over generated tokens: constant, linear:END (α·max(0, 1 − t/END)) or "
                             "step:K:ALPHA2 (α for the first K tokens, then ALPHA2); rules with an α only")
    parser.add_argument("--alpha-gate", dest="alpha_gate", default=None, metavar="SPEC",
                        help="apply α only where the small pair is uncertain: entropy:THRESH (the expert's entropy "
                             "≥ THRESH nats) or disagreement:THRESH (KL(expert ‖ anti-expert) ≥ THRESH nats); "
                             "elsewhere the base decides alone")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyperparameter of the rule, e.g. lam=0.5 or weights=1,0.5 (repeatable)")
    parser.add_argument("--target-adapter", dest="target_adapter", metavar="DIR",
                        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied "
                             "to --target")
    parser.add_argument("--expert-adapter", dest="expert_adapter", action="append", default=[], metavar="DIR",
                        help="a PEFT LoRA adapter applied to --expert (the usual LoRA-tuned expert: --expert BASE "
                             "--expert-adapter DIR); repeat once per --expert")
    parser.add_argument("--anti-expert-adapter", dest="anti_expert_adapter", action="append", default=[],
                        metavar="DIR", help="a PEFT LoRA adapter applied to --anti-expert; repeat once per --anti-expert")
    parser.add_argument("--small-adapter", dest="small_adapter", metavar="DIR", help="a LoRA adapter for --small")
    parser.add_argument("--amateur-adapter", dest="amateur_adapter", metavar="DIR",
                        help="a LoRA adapter for --amateur")
    parser.add_argument("--adapter-mode", dest="adapter_mode", choices=("auto", "unmerged", "merged"),
                        default="auto",
                        help="how adapters are applied: unmerged (W x + s·B A x each step; the base arrays are shared "
                             "with every other role on the same base folder, e.g. the anti-expert: one copy in "
                             "memory), merged (W + s·BA once: a plain model), or auto (default): unmerged when "
                             "another role uses the same base folder, merged when the base is used only once")
    parser.add_argument("--expert-chat-template", action="store_true",
                        help="wrap the expert's prompt in its tokenizer's chat template (as in the paper)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help='JSONL file, one {"prompt": ...} per line')
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    parser.add_argument("--top-k", dest="top_k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                        help="stop strings (the completion is cut before the first one)")
    parser.add_argument("--analysis", action="store_true",
                        help="also write per-token analysis (each model's top-1, prob of the chosen token)")
    parser.add_argument("--output", required=True, help="output JSONL file")
    spec = parser.add_argument_group("speculative decoding (the same greedy tokens / sampling distribution, fewer "
                                     "large-model forwards)")
    spec.add_argument("--speculative", type=int, default=None, metavar="K",
                      help="a drafter proposes K tokens per round, the fused models verify them in one forward")
    spec.add_argument("--drafter", default=None, metavar="DIR",
                      help="the drafter model (same tokenizer); default: the smallest fused model, e.g. the expert "
                           "(needed for plain decoding of --target)")
    spec.add_argument("--adaptive-speculative", dest="adaptive_speculative", action="store_true",
                      help="adapt K per row: +1 after a fully accepted round, -1 after one accepting < K/2")
    parser.add_argument("--placement", default=None, metavar="SPEC",
                        help="each model on its own device group, e.g. base=0-5:fsdp2xtensor3,expert=6,anti_expert=7 "
                             "(ROLES=DEVICES[:MESH] per entry; roles joined by + share a group; default mesh: all "
                             "of a group's devices on fsdp); the same tokens as one device, see decoding.placement")
    parser.add_argument("--topk-cache", dest="topk_cache", type=Path, default=None, metavar="DIR",
                        help="also write the fused distribution's top-k before every generated token as a teacher "
                             "cache for offline_topk, with its training file DIR/train.jsonl (e.g. distill the "
                             "proxy-tuned model into one model)")
    parser.add_argument("--topk", type=int, default=5, help="entries per position of --topk-cache (default 5)")
    bb = parser.add_argument_group("black-box base (proxy-tuning a base known only by its top-k log-probs)")
    bb.add_argument("--base-api", dest="base_api", default=None, metavar="URL",
                    help="an OpenAI-compatible server (e.g. vLLM at http://localhost:8000) whose completions with "
                         "logprobs give the base's top-k at every step; replaces --target")
    bb.add_argument("--base-model", dest="base_model", default=None, help="the model name the server serves")
    bb.add_argument("--base-replay", dest="base_replay", type=Path, default=None, metavar="FILE",
                    help="answer the base's steps from a file recorded with --base-record (no server)")
    bb.add_argument("--base-record", dest="base_record", type=Path, default=None, metavar="FILE",
                    help="with --base-api: also write every answer to FILE (JSONL) for --base-replay")
    bb.add_argument("--base-topk", dest="base_topk", type=int, default=None,
                    help="k of the base's top-k log-probs (default 20, the OpenAI API's cap; with --cross-tokenizer "
                         "and a local --target: the whole vocabulary)")
    parser.add_argument("--cross-tokenizer", dest="cross_tokenizer", action="store_true",
                        help="the base (--target, or --base-api/--base-replay with --base-tokenizer) and the "
                             "expert/anti-expert pair use different tokenizers: align them through text "
                             "(decoding.cross_tokenizer; batched, greedy or sampled)")
    bb.add_argument("--base-tail", dest="base_tail", choices=("uniform", "drop"), default=None,
                    help="the tokens outside the base's top k: their mass spread uniformly (uniform) or the support "
                         "restricted to the top k (drop); default: decoding.blackbox.DEFAULT_TAIL")
    bb.add_argument("--base-tokenizer", dest="base_tokenizer", default=None, metavar="DIR",
                    help="the served model's tokenizer (folder or Hub id; default: the expert's, which must match)")
    bb.add_argument("--base-retries", dest="base_retries", type=int, default=3,
                    help="retries of a failed request, with exponential backoff (default 3)")
    bb.add_argument("--base-api-key-env", dest="base_api_key_env", default=None, metavar="VAR",
                    help="with --base-api: send the API key held in the environment variable VAR (e.g. "
                         "OPENAI_API_KEY) as 'Authorization: Bearer'; the key is never printed or stored")


def check_numbers(args) -> None:
    if args.alpha is not None and not math.isfinite(args.alpha):
        raise UserError(f"--alpha must be a finite number, got {args.alpha}")
    if not (0.0 < args.top_p <= 1.0) or math.isnan(args.top_p):
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}; use 1.0 to turn it off")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if len(args.expert) != len(args.anti_expert):
        raise UserError("give both --expert and --anti-expert (the tuned and untuned small models), as many of "
                        "each, or neither for plain decoding of --target")
    if args.expert_chat_template and not args.expert:
        raise UserError("--expert-chat-template needs --expert")
    if args.topk_cache is not None:
        if args.topk < 1:
            raise UserError(f"--topk must be >= 1, got {args.topk}")
        if (args.topk_cache / "index.json").exists():
            raise UserError(f"--topk-cache {args.topk_cache} already holds a cache; choose a new folder")


def check_speculative_args(args, rule: str, n_models: int) -> None:
    """--speculative / --drafter / --adaptive-speculative checked before any model loads."""
    k = getattr(args, "speculative", None)
    if k is None:
        if getattr(args, "drafter", None) or getattr(args, "adaptive_speculative", False):
            raise UserError("--drafter and --adaptive-speculative go with --speculative K (e.g. --speculative 4)")
        return
    from proxytune_jax.decoding.speculative import check_speculative
    check_speculative(rule, n_models, k, has_drafter=bool(args.drafter), analysis=args.analysis,
                      record_topk=args.topk if args.topk_cache is not None else 0)


def pick_rule(args) -> str:
    if args.rule:
        return args.rule
    if args.expert:
        return "proxy_tuning"
    if args.amateur:
        return "contrastive"
    if args.small:
        raise UserError("--small needs --rule: one of small_large_direct, small_large_temperature, "
                        "small_large_low_confidence, small_large_kl")
    return "plain"


def model_flags(args, rule_name: str) -> list[tuple[str, str]]:
    """``(flag, folder)`` per model, in the rule's role order; refuses missing and unused model flags."""
    from proxytune_jax.decoding.fusion import get_rule
    rule = get_rule(rule_name)
    given = {"--target": [args.target], "--expert": list(args.expert), "--anti-expert": list(args.anti_expert),
             "--small": [args.small] if args.small else [], "--amateur": [args.amateur] if args.amateur else []}
    roles = list(rule.roles)
    if rule.variadic:  # base, then any number of (expert, anti_expert) groups
        pairs = max(1, len(args.expert))
        roles = roles[:1] + roles[1:] * pairs
    flags = [role_flag(rule.name, r) for r in roles]
    needed = {f: flags.count(f) for f in MODEL_FLAGS}
    wanted = " ".join(f"{f} DIR" for f in flags)
    for f in MODEL_FLAGS:
        if len(given[f]) < needed[f]:
            raise UserError(f"--rule {rule.name} needs {wanted}; {f} is missing")
        if len(given[f]) > needed[f]:
            hint = ("; --rule plain decodes --target alone" if rule.name == "plain" else "")
            raise UserError(f"--rule {rule.name} takes {wanted}; drop {f} or pick another rule{hint}")
    taken = {f: iter(v) for f, v in given.items()}
    return [(f, next(taken[f])) for f in flags]


def parse_rule_params(args, rule_name: str) -> dict | None:
    """``--alpha`` and ``--param NAME=VALUE`` as the rule's hyperparameters (checked against the rule)."""
    from proxytune_jax.decoding.fusion import get_rule, resolve_params
    params: dict = {}
    if args.alpha is not None:
        params["alpha"] = args.alpha
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--param {item!r}: write NAME=VALUE, e.g. --param lam=0.5")
        try:
            parts = [float(x) for x in value.split(",")]
        except ValueError:
            raise UserError(f"--param {item!r}: {value!r} is not a number (or a comma list of numbers)") from None
        params[name.strip()] = parts if (len(parts) > 1 or name.strip() == "weights") else parts[0]
    from proxytune_jax.decoding.alpha_control import control_params
    control = control_params(getattr(args, "alpha_schedule", None), getattr(args, "alpha_gate", None))
    if control and "alpha" not in get_rule(rule_name).defaults:
        raise UserError(f"--alpha-schedule/--alpha-gate act on α; --rule {rule_name} has none (use proxy_tuning "
                        "or dexperts)")
    params.update(control)
    if rule_name == "plain" and params:
        raise UserError("--rule plain has no hyperparameters; drop --alpha/--param")
    if rule_name == "eft" and len(params.get("weights", [])) != len(args.expert):
        raise UserError(f"--rule eft: {len(args.expert)} expert/anti-expert pair(s) need as many weights, e.g. "
                        f"--param weights={','.join(['1'] * max(1, len(args.expert)))}")
    resolve_params(rule_name, params)  # unknown names, missing required ones, non-finite values
    return params or None


ADAPTER_FLAGS = {"--target": "target_adapter", "--expert": "expert_adapter", "--anti-expert": "anti_expert_adapter",
                 "--small": "small_adapter", "--amateur": "amateur_adapter"}


def adapter_dirs(args, flags: list[tuple[str, str]]) -> list[Path | None]:
    """The PEFT adapter folder of each model of ``flags`` (or None), read and checked before any loading."""
    from proxytune_jax.models.peft_io import read_adapter_config
    given = {}
    for flag, attr in ADAPTER_FLAGS.items():
        value = getattr(args, attr, None)
        value = [] if value is None else ([value] if isinstance(value, str) else list(value))
        n = sum(f == flag for f, _ in flags)
        if value and len(value) != n:
            raise UserError(f"{flag}-adapter was given {len(value)} time(s) for {n} {flag} model(s); give one adapter "
                            f"per {flag} (or none)")
        given[flag] = iter(value)
    out = []
    for flag, _ in flags:
        value = next(given[flag], None)
        if value is None:
            out.append(None)
            continue
        path = Path(value)
        if not path.is_dir():
            raise UserError(f"{flag}-adapter {value} is not a folder; pass a PEFT LoRA adapter folder "
                            "(adapter_config.json + adapter_model.safetensors)")
        read_adapter_config(path)  # a LoRA adapter in the PEFT format, else a message naming the fix
        out.append(path)
    return out


def load_models(dirs: list[Path], adapters: list[Path | None], mode: str = "auto") -> list:
    """One model per role: each base folder loaded once (roles on the same folder share its arrays), adapters
    applied unmerged or merged (see ``--adapter-mode``; ``auto``: unmerged when another role shares the base)."""
    from proxytune_jax.models.hf_io import load_pretrained
    from proxytune_jax.models.peft_io import attach_adapter
    loaded: dict[Path, object] = {}
    for d in dirs:
        if d not in loaded:
            loaded[d] = load_pretrained(d)
    models = []
    for d, adapter in zip(dirs, adapters):
        if adapter is None:
            models.append(loaded[d])
            continue
        shared = sum(x == d for x in dirs) > 1
        merged = mode == "merged" or (mode == "auto" and not shared)
        models.append(attach_adapter(loaded[d], adapter, merged=merged))
    return models


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt:
            raise UserError("--prompt is empty; give a non-empty prompt")
        return [args.prompt]
    path = Path(args.prompts)
    prompts = []
    for n, row in iter_jsonl(path, what="prompts file", example='{"prompt": "..."}'):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{n}: each line must be an object with a string \"prompt\" field")
        if not row["prompt"]:
            raise UserError(f"{path}:{n}: the prompt is empty; remove the line or give text")
        prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts; add lines like {{\"prompt\": \"...\"}}")
    return prompts


def check_model_dir(flag: str, value: str) -> Path:
    """The local folder of a model flag: a folder, or a Hub id resolved through the Hugging Face cache."""
    from proxytune_jax.models.hub import resolve_model_path
    path = resolve_model_path(value, what=flag)
    if not (path / "config.json").is_file():
        raise UserError(f"{flag} {value} has no config.json; pass a Hugging Face model folder "
                        "(config.json + *.safetensors + tokenizer files)")
    read_json_file(path / "config.json", what=f"{flag} config", fix="re-export the model or copy config.json again")
    return path


def write_completions(out_path: Path, results) -> None:
    """The output JSONL, one completion per line, written atomically (the old file stays on any error)."""
    from proxytune_jax.atomic import open_atomic
    with open_atomic(out_path) as f:
        for r in results:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    print(f"wrote {len(results)} completions to {out_path}")


def open_model_folders(args, flags):
    """``(dirs, adapters, tokenizers, configs, names)`` of the model flags, without loading any weights: each
    folder checked, its adapter folder, tokenizer and parsed config.json, and a display name per flag."""
    from proxytune_jax.models import config_from_hf
    dirs = [check_model_dir(f, v) for f, v in flags]
    adapters = adapter_dirs(args, flags)
    tokenizers = [load_tokenizer(f, d) for (f, _), d in zip(flags, dirs)]
    configs = [config_from_hf(read_json_file(d / "config.json", what=f"{f} config",
                                             fix="re-export the model or copy config.json again"))
               for (f, _), d in zip(flags, dirs)]
    return dirs, adapters, tokenizers, configs, [f"{f} {v}" for f, v in flags]


def load_tokenizer(flag: str, path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad folder
        raise UserError(f"{flag} {path}: could not load its tokenizer ({type(e).__name__}: {e}); the folder "
                        "needs the tokenizer files (tokenizer.json / tokenizer_config.json)") from None


def run(args) -> int:
    check_numbers(args)
    prompts = read_prompts(args)
    out_path = Path(args.output)
    if not out_path.parent.exists():
        raise UserError(f"--output {out_path}: folder {out_path.parent} does not exist; create it first")
    other = ("--cross-tokenizer" if getattr(args, "cross_tokenizer", False) else
             "a black-box base" if getattr(args, "base_api", None) or getattr(args, "base_replay", None) else None)
    if other and (getattr(args, "speculative", None) is not None or getattr(args, "drafter", None)):
        raise UserError(f"--speculative works with local models only, not with {other}; drop --speculative")
    if args.placement is not None and (args.cross_tokenizer or args.base_api or args.base_replay):
        raise UserError("--placement places local models of one tokenizer; drop it with --cross-tokenizer, "
                        "--base-api or --base-replay")
    if getattr(args, "cross_tokenizer", False):
        return run_cross_tokenizer(args, prompts, out_path)
    if getattr(args, "base_api", None) or getattr(args, "base_replay", None):
        return run_blackbox(args, prompts, out_path)
    for flag in ("base_model", "base_record", "base_tail", "base_tokenizer", "base_topk", "base_api_key_env"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag.replace('_', '-')} goes with a black-box base: add --base-api URL or "
                            "--base-replay FILE")
    if args.target is None:
        raise UserError("give the base: --target DIR, or a black-box base with --base-api URL --base-model NAME "
                        "(or --base-replay FILE)")

    rule = pick_rule(args)
    flags = model_flags(args, rule)
    fusion_params = parse_rule_params(args, rule)
    check_speculative_args(args, rule, len(flags))
    placement = args.placement
    if placement is not None:  # checked before any weights load
        if args.speculative is not None:
            raise UserError("--speculative runs every model in one program over one mesh; drop --placement or "
                            "--speculative")
        import jax
        from proxytune_jax.decoding.placement import parse_placement
        parse_placement(placement, rule, len(flags), jax.device_count())
    dirs, adapters, tokenizers, configs, names = open_model_folders(args, flags)

    # Cheap checks on configs before loading weights: tokenizers agree, prompts fit the contexts.
    from proxytune_jax.decoding.vocab import align_vocabularies
    shared = align_vocabularies(tokenizers, [c.vocab_size for c in configs], names).size
    drafter_dir = drafter_tok = None
    if getattr(args, "drafter", None):
        from proxytune_jax.decoding.pipeline import check_drafter_tokenizer
        from proxytune_jax.models import config_from_hf
        drafter_dir = check_model_dir("--drafter", args.drafter)
        drafter_tok = load_tokenizer("--drafter", drafter_dir)
        drafter_cfg = config_from_hf(read_json_file(drafter_dir / "config.json", what="--drafter config",
                                                    fix="re-export the model or copy config.json again"))
        check_drafter_tokenizer(tokenizers[0], names[0], drafter_tok, f"--drafter {args.drafter}",
                                int(drafter_cfg.vocab_size), shared)

    import jax.numpy as jnp  # noqa: F401  (heavy imports only after the argument checks)
    from tqdm import tqdm

    from proxytune_jax.decoding.pipeline import TextGenerator, encode_for_models

    from proxytune_jax.models.hf_io import generation_eos_ids
    for d in dirs:
        generation_eos_ids(d)  # a damaged generation_config.json is reported before any weights load

    chat = [bool(args.expert_chat_template) and f == "--expert" for f, _ in flags]
    encoded = encode_for_models(tokenizers, prompts, chat_template=chat,
                                contexts=[int(c.max_position_embeddings) for c in configs], names=names,
                                max_new_tokens=args.max_new_tokens)

    models = load_models(dirs, adapters, args.adapter_mode)
    drafter = load_models([drafter_dir], [None])[0] if drafter_dir is not None else None
    gen = TextGenerator(models, tokenizers, rule, chat_template=chat, names=names,  # every model's EOS ids
                        drafter=drafter, drafter_tokenizer=drafter_tok, drafter_name=f"--drafter {args.drafter}",
                        placement=placement)
    n_batches = math.ceil(len(prompts) / args.batch_size)
    with tqdm(total=n_batches, desc="generate", unit="batch") as bar:
        results = gen.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               fusion_params=fusion_params, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, stop_strings=args.stop,
                               analysis=args.analysis, encoded=encoded, progress=bar.update,
                               record_topk=args.topk if args.topk_cache is not None else 0,
                               speculative=args.speculative or 0, adaptive_speculative=args.adaptive_speculative)

    write_completions(out_path, results)
    if gen.speculative_report is not None:
        rep = gen.speculative_report
        print(f"speculative k={rep.draft_len}{' (adaptive)' if args.adaptive_speculative else ''}: acceptance "
              f"{rep.acceptance_rate:.3f} ({int(rep.accepted.sum())}/{int(rep.drafted.sum())} draft tokens), "
              f"{rep.tokens_per_round:.2f} tokens per round")
    if args.topk_cache is not None:
        from proxytune_jax.training.recorded_teacher import answers_from_completions, write_teacher_cache
        cache, data, skipped = write_teacher_cache(answers_from_completions(results, gen.eos_ids), tokenizers[0],
                                                   args.topk_cache, skip_mismatched=True)
        print(f"wrote the top-{args.topk} teacher cache {cache} and its training file {data}"
              + (f" ({skipped} completions left out: their tokens are not the tokenizer's encoding of their text)"
                 if skipped else ""))
    return 0


def run_blackbox(args, prompts, out_path: Path) -> int:
    """Proxy-tuning a black-box base (``decoding.blackbox``): --base-api / --base-replay with --expert and
    --anti-expert (one pair, sharing the base's tokenizer)."""
    if args.base_api and args.base_replay:
        raise UserError("--base-api and --base-replay are two sources for the base; give one")
    if args.target is not None:
        raise UserError("--target is the base when its weights are here; with --base-api/--base-replay drop --target")
    if len(args.expert) != 1 or len(args.anti_expert) != 1:
        raise UserError("a black-box base needs one --expert and one --anti-expert (the tuned and untuned small "
                        "models)")
    if (args.rule or "proxy_tuning") != "proxy_tuning" or args.param:
        raise UserError("a black-box base supports --rule proxy_tuning with --alpha (and --alpha-schedule / "
                        "--alpha-gate); drop --rule/--param")
    if args.analysis or args.topk_cache is not None:
        raise UserError("--analysis and --topk-cache need the base's full logits; drop them with a black-box base")
    if args.base_api and not args.base_model:
        raise UserError("--base-api needs --base-model NAME (the model the server serves)")
    check_api_flags(args)
    args.base_topk = 20 if args.base_topk is None else args.base_topk
    if args.base_topk < 1:
        raise UserError(f"--base-topk must be >= 1, got {args.base_topk}")
    if args.base_retries < 0:
        raise UserError(f"--base-retries must be >= 0, got {args.base_retries}")
    fusion_params = parse_rule_params(args, "proxy_tuning")
    flags = [("--expert", args.expert[0]), ("--anti-expert", args.anti_expert[0])]
    dirs, adapters, tokenizers, configs, names = open_model_folders(args, flags)
    from proxytune_jax.decoding.vocab import align_vocabularies
    tok = tokenizers[0]
    if args.base_tokenizer:
        from proxytune_jax.models.hub import resolve_model_path
        tok = load_tokenizer("--base-tokenizer", resolve_model_path(args.base_tokenizer, what="--base-tokenizer"))
        tokenizers = [tok] + tokenizers
        names = [f"--base-tokenizer {args.base_tokenizer}"] + names
        configs = [configs[0]] + configs
    align_vocabularies(tokenizers, [c.vocab_size for c in configs], names)

    from proxytune_jax.decoding import blackbox
    base = blackbox_base(args, tok)
    models = load_models(dirs, adapters, args.adapter_mode)
    gen = blackbox.BlackBoxGenerator(base, models[0], models[1], tok, tail=args.base_tail or blackbox.DEFAULT_TAIL,
                                     expert_chat_template=bool(args.expert_chat_template))
    from tqdm import tqdm
    try:
        with tqdm(total=math.ceil(len(prompts) / args.batch_size), desc="generate", unit="batch") as bar:
            results = gen.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   fusion_params=fusion_params, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed, stop_strings=args.stop, progress=bar.update)
    finally:
        if isinstance(base, blackbox.RecordingTopKBase):
            print(f"recorded {len(base.rows)} base answers to {base.save()}")
    write_completions(out_path, results)
    return 0


def check_api_flags(args) -> None:
    """The flags that only a live API takes."""
    if args.base_record is not None and not args.base_api:
        raise UserError("--base-record records a live API: add --base-api URL")
    if args.base_api_key_env is not None and not args.base_api:
        raise UserError("--base-api-key-env is the key of a live API: add --base-api URL")
    api_key(args)


def api_key(args) -> str | None:
    """The key held in the environment variable named by ``--base-api-key-env`` (never printed: messages name
    the variable only)."""
    import os
    var = getattr(args, "base_api_key_env", None)
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key.strip():
        raise UserError(f"--base-api-key-env {var}: the environment variable {var} is not set or empty; export "
                        "the key in it (e.g. `read -s VAR && export VAR`), or drop the flag for a server without "
                        "keys")
    return key.strip()


def blackbox_base(args, tok):
    """The base of --base-api (recorded with --base-record) or --base-replay, its strings mapped by ``tok``."""
    from proxytune_jax.decoding import blackbox
    if args.base_api:
        base = blackbox.OpenAICompletionsBase(args.base_api, args.base_model, tok, args.base_topk,
                                              retries=args.base_retries, api_key=api_key(args))
        if args.base_record is not None:
            if not args.base_record.parent.exists():
                raise UserError(f"--base-record {args.base_record}: folder {args.base_record.parent} does not exist")
            base = blackbox.RecordingTopKBase(base, args.base_record, tok)
        return base
    return blackbox.ReplayTopKBase(args.base_replay, tok, args.base_topk)


def run_cross_tokenizer(args, prompts, out_path: Path) -> int:
    """--cross-tokenizer: the base and the small pair on different tokenizers (``decoding.cross_tokenizer``)."""
    black = bool(args.base_api or args.base_replay)
    if args.base_api and args.base_replay:
        raise UserError("--base-api and --base-replay are two sources for the base; give one")
    if black == (args.target is not None):
        raise UserError("--cross-tokenizer needs one base: --target DIR, or --base-api/--base-replay with "
                        "--base-tokenizer DIR")
    if black and not args.base_tokenizer:
        raise UserError("--cross-tokenizer with a black-box base needs --base-tokenizer DIR (the served model's "
                        "tokenizer: the base's strings and EOS are read through it)")
    if len(args.expert) != 1 or len(args.anti_expert) != 1:
        raise UserError("--cross-tokenizer needs one --expert and one --anti-expert")
    if (args.rule or "proxy_tuning") != "proxy_tuning" or args.param:
        raise UserError("--cross-tokenizer supports --rule proxy_tuning with --alpha (and --alpha-schedule / "
                        "--alpha-gate); drop --rule/--param")
    if args.analysis or args.topk_cache:
        raise UserError("--analysis and --topk-cache need one vocabulary for all models; drop them with "
                        "--cross-tokenizer")
    if args.base_api and not args.base_model:
        raise UserError("--base-api needs --base-model NAME (the model the server serves)")
    check_api_flags(args)
    if args.base_topk is not None and args.base_topk < 1:
        raise UserError(f"--base-topk must be >= 1, got {args.base_topk}")
    if args.base_tail is not None:
        raise UserError("--base-tail does not apply to --cross-tokenizer: its support is the base's top k (pass "
                        "--base-topk; a local --target uses its whole vocabulary by default)")
    fusion_params = parse_rule_params(args, "proxy_tuning")
    flags = [("--expert", args.expert[0]), ("--anti-expert", args.anti_expert[0])]
    if not black:
        flags = [("--target", args.target)] + flags
    dirs, adapters, tokenizers, configs, names = open_model_folders(args, flags)
    from proxytune_jax.decoding.vocab import align_vocabularies
    align_vocabularies(tokenizers[-2:], [c.vocab_size for c in configs[-2:]], names[-2:])  # the pair: one tokenizer
    if black:
        from proxytune_jax.models.hub import resolve_model_path
        base_tok = load_tokenizer("--base-tokenizer", resolve_model_path(args.base_tokenizer, what="--base-tokenizer"))
        args.base_topk = 20 if args.base_topk is None else args.base_topk
        base = blackbox_base(args, base_tok)
    models = load_models(dirs, adapters, args.adapter_mode)
    if not black:
        from proxytune_jax.decoding.blackbox import LocalTopKBase
        base_tok = tokenizers[0]
        v = min(len(base_tok), configs[0].vocab_size)
        base = LocalTopKBase(models[0], base_tok, k=min(args.base_topk or v, v))
    from proxytune_jax.decoding.cross_tokenizer import CrossTokenizerGenerator
    gen = CrossTokenizerGenerator(base, base_tok, models[-2], models[-1], tokenizers[-1],
                                  expert_chat_template=bool(args.expert_chat_template))
    from tqdm import tqdm
    try:
        with tqdm(total=math.ceil(len(prompts) / args.batch_size), desc="generate", unit="batch") as bar:
            results = gen.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   fusion_params=fusion_params, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed, stop_strings=args.stop, progress=bar.update)
    finally:
        from proxytune_jax.decoding.blackbox import RecordingTopKBase
        if isinstance(base, RecordingTopKBase):
            print(f"recorded {len(base.rows)} base answers to {base.save()}")
    write_completions(out_path, results)
    return 0
