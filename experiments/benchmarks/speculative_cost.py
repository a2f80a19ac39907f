"""Cost model of speculative proxy-tuning: weight bytes read per emitted token, relative to plain decoding of
the base alone, from a measured acceptance (tokens emitted per verification round).

At small batch a decode forward is bound by reading the model's weights once, whatever the number of positions
it scores (the ``K + 1`` verified positions cost about one step). One round of speculative fused decoding reads

    K · W_drafter            K one-token drafter steps
    + Σ_i W_i                one verification forward per fused model (base, expert, anti-expert)

and emits ``τ`` tokens (``τ = 1 + accepted drafts per round``, measured: ``SpeculativeReport.tokens_per_round``),
so its cost per token relative to plain base decoding (``W_base`` per token) is

    cost(K, τ) = (K · W_drafter + Σ_i W_i) / (τ · W_base)

and non-speculative proxy-tuning's is ``Σ_i W_i / W_base``. KV-cache reads, the per-position compute of the
verification and dispatch are left out (they grow the cost; at batch 1 on a GPU they are small against weight
reads of multi-billion-parameter models). The acceptance is the only input measured elsewhere (the toy world):
that it carries over to other models is an assumption, stated wherever a projection is printed.

    python experiments/benchmarks/speculative_cost.py --tokens-per-round 2:2.6 4:3.9 8:5.1
"""
from __future__ import annotations

import argparse

# Parameter counts of the Hugging Face checkpoints (embeddings and LM head included).
PARAMS = {
    "Llama-2-13b": 13_015_864_320,
    "Llama-2-7b": 6_738_415_616,
    "TinyLlama-1.1B": 1_100_048_384,  # same tokenizer as Llama-2 (a separate drafter)
}
BASE, PAIR = "Llama-2-13b", "Llama-2-7b"


def proxy_cost(base: float, others: list[float]) -> float:
    """Non-speculative fused decoding: every model steps once per token."""
    return (base + sum(others)) / base


def speculative_cost(k: int, tokens_per_round: float, base: float, others: list[float], drafter: float) -> float:
    """Weight bytes per emitted token of speculative fused decoding over plain base decoding (module doc)."""
    if k < 1 or not 1.0 <= tokens_per_round <= k + 1:
        raise ValueError(f"need k >= 1 and 1 <= tokens_per_round <= k + 1, got k={k}, τ={tokens_per_round}")
    return (k * drafter + base + sum(others)) / (tokens_per_round * base)


def break_even_tokens_per_round(k: int, base: float, others: list[float], drafter: float) -> float:
    """τ at which speculative fused decoding reads as many bytes per token as plain base decoding."""
    return (k * drafter + base + sum(others)) / base


def projection_rows(measured: dict[str, dict[int, float]]) -> list[dict]:
    """``measured[mode][k] = τ`` -> rows projecting Llama-2-13B + 7B expert / anti-expert, drafted by the 7B
    expert (the toy world's setting: the expert drafts) and, as an optimistic bound, by TinyLlama-1.1B at the same
    acceptance."""
    base, pair = PARAMS[BASE], [PARAMS[PAIR]] * 2
    rows = []
    for drafter in (PAIR, "TinyLlama-1.1B"):
        for mode, by_k in measured.items():
            for k, tau in sorted(by_k.items()):
                rows.append(dict(drafter=drafter, mode=mode, k=k, tokens_per_round=tau,
                                 cost=speculative_cost(k, tau, base, pair, PARAMS[drafter]),
                                 break_even=break_even_tokens_per_round(k, base, pair, PARAMS[drafter])))
    return rows


def print_projection(measured: dict[str, dict[int, float]], source: str) -> list[dict]:
    rows = projection_rows(measured)
    plain = proxy_cost(PARAMS[BASE], [PARAMS[PAIR]] * 2)
    print(f"\nProjected weight bytes per token, over plain {BASE} decoding (acceptance from {source}; assumed to "
          f"carry over). Non-speculative proxy-tuning: {plain:.2f}x.")
    print("| drafter | mode | k | tokens / round (measured) | break-even tokens / round | projected cost |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['drafter']} | {r['mode']} | {r['k']} | {r['tokens_per_round']:.2f} | {r['break_even']:.2f} | "
              f"{r['cost']:.2f}x |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-round", nargs="+", required=True, metavar="K:TAU",
                    help="measured tokens per round for draft length K, e.g. 4:3.2")
    args = ap.parse_args(argv)
    measured = {"given": {int(s.split(":")[0]): float(s.split(":")[1]) for s in args.tokens_per_round}}
    print_projection(measured, "the command line")


if __name__ == "__main__":
    main()
