"""Shared fixtures: tiny random Hugging Face checkpoints (transformers PyTorch) and a tiny tokenizer.

``tiny_checkpoint(kind, seed=0, sharded=False, **config_overrides) -> Path`` writes (once per session and
argument set) a folder with config.json, safetensors weights and a tokenizer that
``transformers.AutoTokenizer`` / ``AutoModelForCausalLM`` and ``proxytune_jax.load_pretrained`` all read.

Kinds (``TINY_KINDS``): "llama" (GQA, untied), "llama3-rope" (rope type llama3, tied), "llama-linear-rope",
"mistral" (sliding window 4), "qwen2" (q/k/v biases, tied), "gpt2". All share one tokenizer, so models of
different sizes built with overrides (e.g. ``hidden_size=64, num_hidden_layers=3``) share a vocabulary, as
proxy-tuning's expert / anti-expert / base need.

The tokenizer is a byte-level BPE (every string encodes) of ``TINY_VOCAB_SIZE`` tokens:
``<pad>``=0, ``<s>``=1 (prepended by ``add_special_tokens=True``), ``</s>``=2, ``<unk>``=3, with a one-line
chat template. torch is imported only inside these fixtures.

Plain helpers the test files import (``from conftest import ...``): ``np_log_softmax`` / ``np_softmax``
(float64 NumPy references), ``write_jsonl`` (rows -> a JSONL file) and ``plus_rows`` (prompt/response
arithmetic rows). Tiny *JAX* models are built with the library's ``proxytune_jax.models.small_llama_config``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

TINY_VOCAB_SIZE = 300
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_POSITIONS = 64

_LLAMA_BASE = dict(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=MAX_POSITIONS,
    rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    tie_word_embeddings=False,
)
TINY_KINDS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_LLAMA_BASE, rope_theta=10000.0)),
    # head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283 fall in all three llama3 bands (<8, 8..64, >64).
    "llama3-rope": ("llama", dict(_LLAMA_BASE, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=0.5, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-linear-rope": ("llama", dict(_LLAMA_BASE, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral": ("mistral", dict(_LLAMA_BASE, sliding_window=4)),
    "qwen2": ("qwen2", dict(_LLAMA_BASE, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "gpt2": ("gpt2", dict(
        vocab_size=TINY_VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
}



def np_log_softmax(x, t: float = 1.0) -> np.ndarray:
    """float64 ``log_softmax(x / t)`` over the last axis (the NumPy reference of the tests)."""
    z = np.asarray(x, np.float64) / t
    mx = z.max(-1, keepdims=True)
    return z - mx - np.log(np.exp(z - mx).sum(-1, keepdims=True))


def np_softmax(x, t: float = 1.0) -> np.ndarray:
    """float64 ``softmax(x / t)`` over the last axis."""
    return np.exp(np_log_softmax(x, t))


def write_jsonl(path, rows) -> str:
    """Write ``rows`` (JSON-serialisable dicts) one per line to ``path`` (parent folders made); ``str(path)``."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def plus_rows(n: int) -> list[dict]:
    """``n * n`` prompt/response rows "q: a plus b?" -> " a: a+b" for a, b in range(n)."""
    return [{"prompt": f"q: {a} plus {b}?", "response": f" a: {a + b}"} for a in range(n) for b in range(n)]


_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "proxy tuning steers a large model with the logits of two small ones",
    "question: what is two plus three? answer: five",
    "knowledge distillation trains a student to match a teacher",
    "Hello world! 0123456789 , . ; : ? ( ) [ ] { } < > = + - * /",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, TINY_VOCAB_SIZE tokens, bos/eos/pad/unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(fast) == TINY_VOCAB_SIZE, len(fast)
    return fast


def build_torch_model(kind: str, seed: int = 0, **overrides):
    """A transformers PyTorch causal LM of ``kind`` with random weights of meaningful size.

    HF initialises norms to 1, biases to 0 and matrices with std 0.02 (near-uniform logits), which would
    make parity tests weak; here every parameter is redrawn: norm weights 1 + 0.1 N(0, 1), biases
    0.1 N(0, 1), matrices 0.15 N(0, 1).
    """
    import torch
    import transformers

    if kind not in TINY_KINDS:
        raise KeyError(f"unknown tiny model kind {kind!r}; known: {sorted(TINY_KINDS)}")
    model_type, kwargs = TINY_KINDS[kind]
    config = transformers.AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and (name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Folder holding only the tiny tokenizer (AutoTokenizer.from_pretrained works on it)."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """Factory ``tiny_checkpoint(kind="llama", seed=0, sharded=False, **config_overrides) -> Path``.

    Cached per argument set for the whole session; ``sharded=True`` saves ~4 safetensors shards with
    ``model.safetensors.index.json`` (transformers' own sharding).
    """
    from transformers import AutoTokenizer

    made = {}
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    def make(kind: str = "llama", seed: int = 0, sharded: bool = False, **overrides):
        key = (kind, seed, sharded, tuple(sorted(overrides.items())))
        if key not in made:
            model = build_torch_model(kind, seed, **overrides)
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            if sharded:
                total = sum(p.numel() * 4 for p in model.parameters())
                model.save_pretrained(path, max_shard_size=max(total // 4, 1))
            else:
                model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def torch_lm():
    """Factory ``torch_lm(path) -> transformers PyTorch model`` (eval mode, float32, cached per path)."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = {}

    def load(path):
        if str(path) not in loaded:
            loaded[str(path)] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[str(path)]

    return load


@pytest.fixture(scope="session")
def toyworld_default(tmp_path_factory):
    """The demo's toy world for world seed 0 (``commands.demo.configs(False, 0)``), built once per test session
    into a cache shared by the pytest-xdist workers (a file lock: one worker builds, the others wait and load)."""
    from filelock import FileLock

    from proxytune_jax.commands.demo import configs
    from proxytune_jax.toyworld.build import build_toyworld

    root = tmp_path_factory.getbasetemp().parent / "toyworld_default"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / ".lock")):
        return build_toyworld(configs(False, 0).toyworld, root / "cache", progress=False, log=lambda *_: None)


def persistent_compilation_cache(path):
    """JAX's persistent compilation cache in ``path`` while the generator is suspended (a fixture body: ``yield
    from``), and off again afterwards. JAX initializes its cache once per process and ignores later changes of
    ``jax_compilation_cache_dir``, so the cache is reset on both sides: otherwise every later module of the
    xdist worker would keep serializing its executables into this directory."""
    import jax
    from jax._src import compilation_cache

    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()
    try:
        yield str(path)
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
        compilation_cache.reset_cache()


def _optimizations_off():
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def fast_compiles():
    """For modules of tiny models, where compile time dominates: XLA's optimizations turned down while the module
    runs (``pytestmark = pytest.mark.usefixtures("fast_compiles")``)."""
    yield from _optimizations_off()


@pytest.fixture
def fast_compiles_one_test():
    """``fast_compiles`` for one test of a module whose other tests keep XLA's optimizations."""
    yield from _optimizations_off()


def mismatched_tokenizer_dir(src, tmp_path):
    """A copy of the model folder ``src`` whose tokenizer swaps ids 120 and 121 (a genuinely different tokenizer
    with the same vocabulary size)."""
    import json
    import shutil

    dst = tmp_path / "other_tok"
    shutil.copytree(src, dst)
    state = json.loads((dst / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    inv = {i: t for t, i in vocab.items()}
    vocab[inv[120]], vocab[inv[121]] = 121, 120
    (dst / "tokenizer.json").write_text(json.dumps(state))
    return dst


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Every module's compiled programs (and the constants they hold) are released when the module ends. An xdist
    worker runs dozens of modules; without this its resident memory grew past 6 GB, and two full runs on the
    2-core machine each lost a worker to a segmentation fault inside XLA late in the run (once in a persistent
    cache write, since fixed, once in a CPU compile)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
