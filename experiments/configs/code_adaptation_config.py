"""Config of ``experiments/code_adaptation.py``: proxy-tune Llama-2-13B for code with CodeLlama-7B-Python."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig


@dataclass(frozen=True)
class CodeAdaptationConfig:
    base: str = "checkpoints/Llama-2-13b-hf"
    expert: str = "checkpoints/CodeLlama-7b-Python-hf"
    anti_expert: str = "checkpoints/Llama-2-7b-hf"
    data: str = "data/humaneval/HumanEval.jsonl"
    max_examples: int | None = None
    alpha: float = 1.0
    num_samples: int = 20  # samples per problem for the unbiased pass@k estimate
    temperature: float = 0.8  # the paper's released results use t=0.8 (pass@10)
    top_p: float = 0.95
    ks: tuple[int, ...] = (1, 10)
    max_new_tokens: int = 512
    execute_code: bool = False  # run the unit tests (executes model-written code: sandbox only)
    batch_size: int = 8
    dtype: str = "bfloat16"
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)
    out_dir: str = "results/code_adaptation"
    seed: int = 0


CONFIG = CodeAdaptationConfig()
