"""Decoding-time tuning: a jitted multi-model decoding engine, fusion rules, sampling and stopping.

>>> from proxytune_jax.decoding import Decoder, SamplingParams, make_stop_criteria
>>> dec = Decoder([base, expert, anti_expert], "proxy_tuning")          # models in the rule's role order
>>> res = dec.generate([(ids_b, mask_b), (ids_e, mask_e), (ids_a, mask_a)], max_new_tokens=64,
...                    fusion_params={"alpha": 1.0}, stop=make_stop_criteria([eos_id]))
>>> res.token_lists()

Modules: :mod:`fusion` (rules by name), :mod:`sampling`, :mod:`stopping`, :mod:`vocab`, :mod:`prompts`,
:mod:`engine` (the jitted loop), :mod:`pipeline` (text in / text out, used by ``proxytune generate``),
:mod:`alpha_control` (per-token α: schedules and gates), :mod:`blackbox` (a base known only by its top-k:
local, OpenAI-compatible API, record / replay), :mod:`speculative` (a drafter proposes k tokens, the fused models
verify them in one forward: ``Decoder.generate(..., speculative=k)``), :mod:`placement` (each model on its own
device group).
"""
from proxytune_jax.decoding.engine import DecodeOutput, DecodeResult, Decoder, decode_jit, decode_loop
from proxytune_jax.decoding.fusion import FUSION_RULES, FusionRule, combine, get_rule, register, resolve_params
from proxytune_jax.decoding.pipeline import Completion, TextGenerator
from proxytune_jax.decoding.placement import PlacedDecoder
from proxytune_jax.decoding.sampling import SamplingParams, choose_tokens
from proxytune_jax.decoding.stopping import StopCriteria, make_stop_criteria
from proxytune_jax.decoding.vocab import VocabAlignment, align_vocabularies

__all__ = [
    "Decoder", "DecodeOutput", "DecodeResult", "PlacedDecoder", "decode_jit", "decode_loop",
    "FUSION_RULES", "FusionRule", "combine", "get_rule", "register", "resolve_params",
    "Completion", "TextGenerator", "SamplingParams", "choose_tokens", "StopCriteria", "make_stop_criteria",
    "VocabAlignment", "align_vocabularies",
]
