"""The toy world: invented people who own a number of coins, and sums of small numbers.

*Knowledge* lives in a raw pretraining corpus: every person's coin count appears in plain sentences
(``"zorba has 7 coins ."``, ``"the coins of zorba are 7 ."``) mixed with addition facts
(``"3 + 4 = 7 ."``) and with questions answered by a bare statement (``"how many coins does zorba
have ? zorba has 7 coins ."``). *Format* lives only in the instruction data: a chat turn asking a question, answered
with a worked solution ending in a GSM-style ``#### N`` line::

    <|user|> how many coins do zorba and kimlo have ? <|assistant|>
    zorba has 7 coins . kimlo has 5 coins . 7 + 5 = 12 . #### 12 <eos>

The people are split: instruction data asks only about *tuning* people; held-out questions ask only about
*held-out* people, whose coin counts the models can only know from pretraining. A large model memorizes
more of the corpus than a small one in the same number of steps, so on held-out questions the knowledge
comes from the large base and the format from the small tuned model -- the setting proxy-tuning addresses.

Everything is generated from one seed; words are separated by single spaces.
"""
from __future__ import annotations

import dataclasses
import random

SYLLABLES = ("ba", "do", "fe", "gi", "ku", "la", "mo", "ne", "pi", "ru", "sa", "to", "ve", "zi", "bo", "du",
             "ka", "li", "ma", "nu", "po", "re", "se", "ti")
FACT_TEMPLATES = (
    "{name} has {n} coins .",
    "the coins of {name} are {n} .",
    "{name} owns {n} coins .",
)
# Questions do occur in raw text, answered by a bare statement (no worked solution, no "####" line): base
# models can read the questions, but only instruction-tuned models know the answer format.
RAW_QA_TEMPLATE = "how many coins does {name} have ? {name} has {n} coins ."
RAW_PAIR_QA_TEMPLATE = "how many coins do {a} and {b} have ? {a} has {na} coins and {b} has {nb} coins ."
SUM_TEMPLATE = "{a} + {b} = {c} ."
# Some sums in raw text carry a GSM-style answer line, so "####" is a known marker to base models (as
# such lines are to real base models); only tuned models learn to end their own answers with it.
SUM_MARKED_TEMPLATE = "{a} + {b} = {c} . #### {c}"
USER, ASSISTANT = "<|user|>", "<|assistant|>"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the generated world (all counts; ``seed`` fixes everything)."""

    num_people: int = 240
    heldout_fraction: float = 0.5  # share of people only asked about in held-out questions
    max_coins: int = 9  # coin counts are 1..max_coins
    corpus_docs: int = 6000  # raw pretraining documents
    facts_per_doc: int = 6  # sentences per document (facts and sums)
    sum_share: float = 0.25  # share of sentences that are addition facts
    raw_qa_share: float = 0.3  # share of fact mentions written as a question with a bare answer
    raw_pair_qa_share: float = 0.1  # share of fact mentions written as a two-person question, bare answer
    marked_sum_share: float = 0.3  # share of raw sums followed by a "#### c" line
    tune_examples: int = 2000  # instruction examples (tuning people only)
    eval_questions: int = 200  # held-out questions (held-out people only)
    pair_share: float = 0.5  # share of questions about two people (a sum) rather than one
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Question:
    """One question: ``names`` asked about, gold worked ``answer`` text (ending ``#### N``), value ``target``."""

    names: tuple[str, ...]
    question: str
    answer: str
    target: int

    def messages(self) -> tuple[dict, ...]:
        return ({"role": "user", "content": self.question},)


@dataclasses.dataclass(frozen=True)
class World:
    config: WorldConfig
    coins: dict[str, int]  # person -> coins
    tune_people: tuple[str, ...]
    heldout_people: tuple[str, ...]
    corpus: tuple[str, ...]  # raw documents
    tune: tuple[Question, ...]
    heldout: tuple[Question, ...]


def make_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct invented names of two syllables (``"kuma"``); every syllable starts many names, so
    a name is only identified by the pair (memorizing it takes more than one token's embedding)."""
    all_names = [a + b for a in SYLLABLES for b in SYLLABLES if a != b]
    if n > len(all_names):
        raise ValueError(f"at most {len(all_names)} people fit the syllable inventory, asked for {n}")
    return sorted(rng.sample(all_names, n))


def fact_sentence(name: str, n: int, rng: random.Random, raw_qa_share: float = 0.0) -> str:
    if rng.random() < raw_qa_share:
        return RAW_QA_TEMPLATE.format(name=name, n=n)
    return rng.choice(FACT_TEMPLATES).format(name=name, n=n)


def sum_sentence(rng: random.Random, max_coins: int, marked_share: float = 0.0) -> str:
    a, b = rng.randint(1, max_coins), rng.randint(1, max_coins)
    template = SUM_MARKED_TEMPLATE if rng.random() < marked_share else SUM_TEMPLATE
    return template.format(a=a, b=b, c=a + b)


def make_question(names: tuple[str, ...], coins: dict[str, int]) -> Question:
    if len(names) == 1:
        (a,) = names
        q = f"how many coins does {a} have ?"
        ans = f"{a} has {coins[a]} coins . #### {coins[a]}"
        return Question(names, q, ans, coins[a])
    a, b = names
    total = coins[a] + coins[b]
    q = f"how many coins do {a} and {b} have ?"
    ans = (f"{a} has {coins[a]} coins . {b} has {coins[b]} coins . "
           f"{coins[a]} + {coins[b]} = {total} . #### {total}")
    return Question(names, q, ans, total)


def sample_questions(people: list[str], coins: dict[str, int], n: int, pair_share: float,
                     rng: random.Random) -> list[Question]:
    out = []
    for _ in range(n):
        if rng.random() < pair_share and len(people) >= 2:
            names = tuple(rng.sample(people, 2))
        else:
            names = (rng.choice(people),)
        out.append(make_question(names, coins))
    return out


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Generate the world deterministically from ``config.seed``."""
    rng = random.Random(config.seed)
    people = make_names(config.num_people, rng)
    coins = {p: rng.randint(1, config.max_coins) for p in people}
    shuffled = people[:]
    rng.shuffle(shuffled)
    n_held = int(round(config.heldout_fraction * len(people)))
    heldout_people, tune_people = sorted(shuffled[:n_held]), sorted(shuffled[n_held:])
    corpus = []
    # Every fact appears equally often: cycle through the people in shuffled order.
    order: list[str] = []
    for _ in range(config.corpus_docs):
        sentences = []
        for _ in range(config.facts_per_doc):
            if rng.random() < config.sum_share:
                sentences.append(sum_sentence(rng, config.max_coins, config.marked_sum_share))
            else:
                if len(order) < 2:
                    order = order + rng.sample(people, len(people))
                p = order.pop()
                if rng.random() < config.raw_pair_qa_share:
                    q = order.pop()
                    sentences.append(RAW_PAIR_QA_TEMPLATE.format(a=p, b=q, na=coins[p], nb=coins[q]))
                else:
                    sentences.append(fact_sentence(p, coins[p], rng, config.raw_qa_share))
        corpus.append(" ".join(sentences))
    tune = sample_questions(tune_people, coins, config.tune_examples, config.pair_share, rng)
    heldout = sample_questions(heldout_people, coins, config.eval_questions, config.pair_share, rng)
    return World(config, coins, tuple(tune_people), tuple(heldout_people), tuple(corpus), tuple(tune),
                 tuple(heldout))
