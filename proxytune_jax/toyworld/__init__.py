"""The toy world behind ``proxytune demo``: a generated domain with *knowledge* (invented people's coin
counts, in a raw pretraining corpus) and *format* (worked answers ending in ``#### N``, only in instruction
data), a word-level tokenizer in Hugging Face format, and four Llama models (base/tuned × small/large)
trained by the library's trainer (``training.fit``) and cached as Hugging Face folders; ``transfer`` and
``distill`` hold the distillation regime and its table; ``bpe_pair`` a second tokenizer (byte-level BPE) and a
small pair trained with it, for cross-tokenizer proxy-tuning.

>>> from proxytune_jax.toyworld import ToyWorldConfig, build_toyworld
>>> tw = build_toyworld(ToyWorldConfig())          # trains on first use, then cached
>>> base_large, tuned_small = tw.load("base-large"), tw.load("tuned-small")
"""
from proxytune_jax.toyworld.build import MODEL_NAMES, ModelSize, ToyWorld, ToyWorldConfig, build_toyworld, default_cache_dir
from proxytune_jax.toyworld.world import Question, World, WorldConfig, build_world

__all__ = ["MODEL_NAMES", "ModelSize", "ToyWorld", "ToyWorldConfig", "build_toyworld", "default_cache_dir",
           "Question", "World", "WorldConfig", "build_world"]
