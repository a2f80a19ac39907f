"""Text in, text out: tokenizers + models + :class:`engine.Decoder` (what ``proxytune generate`` runs).

:class:`TextGenerator` tokenizes each prompt per model (plain, or the model's chat template where asked),
left-pads each batch to a bucketed length (so a new prompt length rarely recompiles), pads the last batch to
the batch size (same shapes for every batch), decodes, and turns ids back into text with the **first**
model's tokenizer (all tokenizers agree on the shared range), trimming at the first stop string.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from proxytune_jax.decoding.engine import Decoder, eos_ids_of
from proxytune_jax.decoding.prompts import bucket_length, encode_prompt, left_pad
from proxytune_jax.decoding.sampling import SamplingParams
from proxytune_jax.decoding.stopping import FINISH_REASONS, STOP_STRING, make_stop_criteria, trim_at_stop
from proxytune_jax.decoding.vocab import align_vocabularies
from proxytune_jax.errors import UserError


def eos_ids_for(config, tokenizer, generation_config: dict | None = None) -> list[int]:
    """Union of the EOS ids of a model's config, its generation_config.json and its tokenizer."""
    ids = set(eos_ids_of(config))
    g = (generation_config or {}).get("eos_token_id")
    if g is not None:
        ids.update([g] if isinstance(g, int) else list(g))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def encode_for_models(tokenizers: Sequence, prompts: Sequence[str], *, chat_template: Sequence[bool],
                      contexts: Sequence[int], names: Sequence[str], max_new_tokens: int) -> list[list[list[int]]]:
    """Per model, per prompt token ids; UserError for an empty tokenization or a prompt that with
    ``max_new_tokens`` exceeds a model's context (``max_position_embeddings``)."""
    out = []
    for i, tok in enumerate(tokenizers):
        seqs = [encode_prompt(tok, p, chat_template=chat_template[i]) for p in prompts]
        for j, s in enumerate(seqs):
            if not s:
                raise UserError(f"prompt {j + 1} is empty for {names[i]} (no tokens); give a non-empty prompt")
            if len(s) + max_new_tokens > contexts[i]:
                raise UserError(
                    f"prompt {j + 1} has {len(s)} tokens for {names[i]}; with max_new_tokens={max_new_tokens} "
                    f"that exceeds its context of {contexts[i]} tokens; shorten the prompt or lower "
                    "--max-new-tokens")
        out.append(seqs)
    return out


@dataclasses.dataclass
class Completion:
    prompt: str
    completion: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length"
    analysis: dict | None = None
    topk: Any = None  # record_topk: the fused distribution's top-k before each token (topk.TopK [n, k])

    def to_json(self) -> dict:
        d = {"prompt": self.prompt, "completion": self.completion, "token_ids": self.token_ids,
             "finish_reason": self.finish_reason}
        if self.analysis is not None:
            d["analysis"] = self.analysis
        return d


class TextGenerator:
    """``models[i]`` with ``tokenizers[i]``, in the rule's role order; ``chat_template[i]`` says whether model i
    reads its prompt through its tokenizer's chat template (default: none do). ``mesh``: every model on one mesh;
    ``placement``: each model on its own device group instead (:mod:`placement`, e.g. ``"base=0-5,expert=6,
    anti_expert=7"``)."""

    def __init__(self, models: Sequence, tokenizers: Sequence, rule: str = "proxy_tuning", *,
                 chat_template: Sequence[bool] | None = None, names: Sequence[str] | None = None,
                 eos_ids: Sequence[int] | None = None, mesh=None, drafter=None, drafter_tokenizer=None,
                 drafter_name: str = "--drafter", placement=None):
        self.tokenizers = list(tokenizers)
        self.names = list(names or [f"model {i}" for i in range(len(models))])
        self.alignment = align_vocabularies(self.tokenizers, [m.config.vocab_size for m in models], self.names)
        if placement is not None:  # each model on its own device group (decoding.placement)
            if mesh is not None:
                raise UserError("give a mesh (every model on it) or a placement (a device group per model), not both")
            from proxytune_jax.decoding.placement import PlacedDecoder
            self.decoder = PlacedDecoder(models, rule, placement=placement, vocab_size=self.alignment.size)
        else:
            self.decoder = Decoder(models, rule, vocab_size=self.alignment.size, mesh=mesh)
        self.chat_template = list(chat_template or [False] * len(models))
        self.contexts = [int(m.config.max_position_embeddings) for m in models]
        # Every model's EOS ids (config, generation_config.json via load_pretrained, tokenizer): the tokenizers are
        # the same, and an expert's chat end-of-turn token ends the fused text as it ends the expert's.
        self.eos_ids = list(eos_ids) if eos_ids is not None else sorted(
            {e for m, t in zip(models, self.tokenizers) for e in eos_ids_for(m.config, t)})
        tok0 = self.tokenizers[0]
        self.pad_id = int(tok0.pad_token_id if tok0.pad_token_id is not None else (self.eos_ids or [0])[0])
        self.drafter = drafter  # speculative decoding's separate drafter (it reads model 0's prompt)
        if drafter is not None:
            check_drafter_tokenizer(tok0, self.names[0], drafter_tokenizer or tok0, drafter_name,
                                    int(drafter.config.vocab_size), self.alignment.size)
        self.speculative_report = None  # the last generate's acceptance statistics (speculative decoding)

    def encode(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[list[int]]]:
        return encode_for_models(self.tokenizers, prompts, chat_template=self.chat_template,
                                 contexts=self.contexts, names=self.names, max_new_tokens=max_new_tokens)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                 fusion_params: dict | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stop_strings: Sequence[str] = (), analysis: bool = False,
                 encoded: list[list[list[int]]] | None = None, progress=None,
                 record_topk: int = 0, speculative: int = 0, adaptive_speculative: bool = False) -> list[Completion]:
        """Decode all prompts in batches of ``batch_size`` (the last one padded). ``progress``: a callable
        advanced once per batch (e.g. a tqdm's ``update``). Sampling is batch-invariant: prompt i draws from
        the stream of ``(seed, i)``, whatever ``batch_size`` and its row. ``record_topk = k``: each completion also gets the
        fused distribution's top k before each of its tokens (``Completion.topk``). ``speculative = K``: speculative
        decoding (``Decoder.generate``), its summed acceptance statistics left in ``self.speculative_report``."""
        encoded = encoded if encoded is not None else self.encode(prompts, max_new_tokens)
        v = self.alignment.size
        sampling = SamplingParams.create(v, temperature=temperature, top_k=top_k, top_p=top_p)
        stop = make_stop_criteria(self.eos_ids, stop_strings, self.tokenizers[0], v)
        # One bucket per model for the whole run (same shapes for every batch: one compile). Speculative
        # decoding's caches hold K + 2 slots more.
        extra = speculative + 2 if speculative else 0
        lengths = [bucket_length(max(len(s) for s in seqs), cap=ctx - max_new_tokens - extra)
                   for seqs, ctx in zip(encoded, self.contexts)]
        spec = dict(speculative=speculative, drafter=self.drafter if speculative else None,
                    adaptive_speculative=adaptive_speculative) if speculative else {}
        reports = []
        results: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            rows = idx + [idx[-1]] * (batch_size - len(idx))  # pad the last batch
            batch = [left_pad([encoded[i][r] for r in rows], lengths[i], self.pad_id)
                     for i in range(len(encoded))]
            res = self.decoder.generate(batch, max_new_tokens=max_new_tokens, fusion_params=fusion_params,
                                        sampling=sampling, stop=stop, seed=seed, analysis=analysis,
                                        pad_id=self.pad_id, record_topk=record_topk, row_ids=rows, **spec)
            if speculative:  # rows of the padded last batch repeat a prompt: counted once
                reports.append(_rows_of(res.speculative, len(idx)))
            for k, r in enumerate(idx):
                ids = res.tokens[k, : int(res.num_tokens[k])].tolist()
                text = self.tokenizers[0].decode(ids, skip_special_tokens=True)
                reason = int(res.finish_reason[k])
                if stop_strings:
                    text, found = trim_at_stop(text, stop_strings)
                    if found:
                        reason = STOP_STRING
                ana = None
                if analysis:
                    n = len(ids)
                    ana = {"top1": res.analysis["top1"][k, :n].tolist(),
                           "chosen_prob": np.round(res.analysis["chosen_prob"][k, :n], 6).tolist(),
                           "changed": res.analysis["changed"][k, :n].astype(int).tolist()}
                top = None
                if record_topk:
                    from proxytune_jax.topk import TopK
                    top = TopK(res.topk.ids[k, :len(ids)], res.topk.logp[k, :len(ids)])
                results.append(Completion(prompts[r], text, ids, FINISH_REASONS[reason], ana, top))
            if progress is not None:
                progress(1)
        if reports:
            from proxytune_jax.decoding.speculative import SpeculativeReport
            self.speculative_report = SpeculativeReport(
                speculative, *(np.concatenate([getattr(r, f) for r in reports])
                               for f in ("rounds", "drafted", "accepted")))
        return results


def _rows_of(report, n: int):
    import dataclasses as dc
    return dc.replace(report, rounds=report.rounds[:n], drafted=report.drafted[:n], accepted=report.accepted[:n])


def check_drafter_tokenizer(tok0, name0: str, drafter_tok, drafter_name: str, drafter_vocab: int,
                            shared: int) -> None:
    """A speculative drafter must propose ids of the fused models' tokenizer: UserError naming the fix."""
    try:
        alignment = align_vocabularies([tok0, drafter_tok], [shared, drafter_vocab], [name0, drafter_name])
    except UserError as e:
        raise UserError(f"the drafter must share the fused models' tokenizer: {e}. Pick a drafter of the same "
                        "family (or drop --drafter: the expert drafts by default)") from None
    if alignment.size < shared:
        raise UserError(f"{drafter_name} covers {alignment.size} ids of the fused models' {shared}; pick a drafter "
                        "on the same tokenizer (or drop --drafter: the expert drafts by default)")
