"""Config of ``experiments/summarization_fusion.py``: GPT-2 small guided by GPT-2 medium on CNN/DailyMail."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig


@dataclass(frozen=True)
class SummarizationFusionConfig:
    small: str = "checkpoints/gpt2"  # 124M
    large: str = "checkpoints/gpt2-medium"  # 355M
    data: str = "data/cnn_dailymail/3.0.0"  # folder with test-*.parquet (or a file)
    split: str = "test"
    max_examples: int | None = 1000
    max_article_words: int = 400  # keeps prompt + 100 new tokens within GPT-2's 1024 positions
    max_new_tokens: int = 100
    # (rule, params) per fused setting: each rule's own defaults (proxytune_jax.decoding.fusion.FUSION_RULES)
    fusions: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
        ("small_large_direct", (("lam", 0.5),)),
        ("small_large_temperature", (("lam", 0.5), ("temperature", 2.0))),
        ("small_large_low_confidence", (("lam", 0.5), ("theta", 0.1))),
    )
    batch_size: int = 16
    dtype: str = "float32"
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=1, tensor=1)  # small models: pure data parallelism
    out_dir: str = "results/summarization_fusion"
    seed: int = 0


CONFIG = SummarizationFusionConfig()
