"""Config of ``experiments/proxy_tune_llama2.py``: proxy-tune Llama-2-13B (base) with Llama-2-7B-chat (expert)
and Llama-2-7B (anti-expert) on GSM8K, TruthfulQA (generation + MC), AlpacaFarm/AlpacaEval and ToxiGen.

Paths are local folders (download the checkpoints and datasets yourself; nothing is fetched)."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig


@dataclass(frozen=True)
class ProxyTuneConfig:
    base: str = "checkpoints/Llama-2-13b-hf"
    expert: str = "checkpoints/Llama-2-7b-chat-hf"
    anti_expert: str = "checkpoints/Llama-2-7b-hf"
    tuned: str | None = "checkpoints/Llama-2-13b-chat-hf"  # the directly tuned target, for "gap closed"
    # task name (proxytune_jax.data.TASKS) -> local data path
    tasks: tuple[tuple[str, str], ...] = (
        ("gsm8k", "data/gsm8k/test.jsonl"),
        ("truthfulqa", "data/truthfulqa/TruthfulQA.csv"),
        ("truthfulqa_mc", "data/truthfulqa/TruthfulQA.csv"),
        ("alpaca_eval", "data/alpaca_eval/alpaca_eval.json"),
        ("toxigen", "data/toxigen/prompts"),
    )
    alpha: float = 1.0  # proxy-tuning strength (paper: 1.0, greedy decoding)
    system_prompt: str | None = None  # the paper uses none for Llama-2-chat
    max_examples: int | None = None  # per task; None = the whole file
    max_new_tokens: int | None = None  # None = each task's own budget (GSM 512, AlpacaEval 2048, ...)
    batch_size: int = 8
    dtype: str = "bfloat16"
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)  # params FSDP-sharded over all devices
    out_dir: str = "results/proxy_tune_llama2"
    seed: int = 0


CONFIG = ProxyTuneConfig()
