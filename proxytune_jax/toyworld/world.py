"""The toy world: invented people who own a number of coins, and sums of small numbers.

*Knowledge* lives in a raw pretraining corpus: every person's coin count appears in plain sentences
(``"zi ka has 7 coins ."``) mixed with addition facts (``"3 + 4 = 7 ."``) and with questions answered by
bare statements (``"how many coins does zi ka have ? zi ka has 7 coins ."``). *Format* lives only in the
instruction data: a chat turn asking a question, answered with a worked solution ending in a GSM-style
``#### N`` line::

    <|user|> how many coins do zi ka and mo ru have ? <|assistant|>
    zi ka has 7 coins . mo ru has 5 coins . 7 + 5 = 12 . #### 12 <eos>

A person's name is two words (a first and a family syllable, each used by many people), so a coin count is
keyed by a *pair* of tokens: recalling it takes attention plus a memorized lookup in the MLPs, which a wide
model stores and a narrow one cannot -- a capacity gap like the one between a 7B and a 70B model, not just a
difference in training time. The worked answer repeats the raw corpus's statements word for word (only the sum
line and the ``#### N`` line are new), so tuned and base models read the same context at every token that
needs no knowledge.

The people are split: instruction data asks only about *tuning* people; held-out questions ask only about
*held-out* people, whose coin counts the models can only know from pretraining. On held-out questions the
knowledge must come from the large base and the format from the small tuned model -- the setting
proxy-tuning addresses.

Everything is generated from one seed; words are separated by single spaces.
"""
from __future__ import annotations

import dataclasses
import random

SYLLABLES = ("ba", "do", "fe", "gi", "ku", "la", "mo", "ne", "pi", "ru", "sa", "to", "ve", "zi", "bo", "du",
             "ka", "li", "ma", "nu", "po", "re", "se", "ti", "ha", "jo", "wu", "ye", "xi", "qu")
# The statement both formats share: raw text and worked answers say a person's coins in exactly these words,
# so base models (raw text) and tuned models (worked answers) agree on every token that needs no knowledge.
FACT_TEMPLATE = "{name} has {n} coins ."
# Questions do occur in raw text, answered by bare statements (no sum, no "####" line): base models can
# read the questions and copy the names, but only instruction-tuned models know the worked-answer format.
RAW_QA_TEMPLATE = "how many coins does {name} have ? {name} has {n} coins ."
RAW_PAIR_QA_TEMPLATE = "how many coins do {a} and {b} have ? {a} has {na} coins . {b} has {nb} coins ."
SUM_TEMPLATE = "{a} + {b} = {c} ."
# Some sums and statements in raw text carry a GSM-style answer line, so "####" (and that the number after it
# repeats the one just stated) is known to base models, as such lines are to real base models; only tuned
# models learn to end their own answers with it.
SUM_MARKED_TEMPLATE = "{a} + {b} = {c} . #### {c}"
FACT_MARKED_TEMPLATE = "{name} has {n} coins . #### {n}"
USER, ASSISTANT = "<|user|>", "<|assistant|>"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the generated world (all counts; ``seed`` fixes everything)."""

    num_people: int = 400
    heldout_fraction: float = 0.5  # share of people only asked about in held-out questions
    max_coins: int = 9  # coin counts are 1..max_coins
    corpus_docs: int = 3000  # raw pretraining documents
    doc_words: int = 40  # words per raw document at most (sentences are packed up to it: rows pad little)
    sum_share: float = 0.25  # share of sentences that are addition facts
    raw_qa_share: float = 0.3  # share of fact mentions written as a question with a bare answer
    raw_pair_qa_share: float = 0.1  # share of fact mentions written as a two-person question, bare answers
    marked_sum_share: float = 0.1  # share of raw sums followed by a "#### c" line
    marked_fact_share: float = 0.1  # share of plain raw statements followed by a "#### n" line
    tune_examples: int = 1000  # instruction examples (tuning people only)
    eval_questions: int = 200  # held-out questions (held-out people only)
    pair_share: float = 0.25  # share of questions about two people (a sum) rather than one
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
    """``n`` distinct invented two-word names (``"ku ma"``: first syllable, family syllable). Every syllable
    starts and ends many names, so a person is only identified by the pair of tokens."""
    all_names = [f"{a} {b}" for a in SYLLABLES for b in SYLLABLES if a != b]
    if n > len(all_names):
        raise ValueError(f"at most {len(all_names)} people fit the syllable inventory, asked for {n}")
    return sorted(rng.sample(all_names, n))


def fact_sentence(name: str, n: int, rng: random.Random, raw_qa_share: float = 0.0,
                  marked_share: float = 0.0) -> str:
    if rng.random() < raw_qa_share:
        return RAW_QA_TEMPLATE.format(name=name, n=n)
    template = FACT_MARKED_TEMPLATE if rng.random() < marked_share else FACT_TEMPLATE
    return template.format(name=name, n=n)


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
    # Every fact appears equally often: cycle through the people in shuffled order. Sentences are packed into
    # documents of at most ``doc_words`` words (a sentence never straddles two documents).
    order: list[str] = []

    def next_sentence() -> str:
        nonlocal order
        if rng.random() < config.sum_share:
            return sum_sentence(rng, config.max_coins, config.marked_sum_share)
        if len(order) < 2:
            order = order + rng.sample(people, len(people))
        p = order.pop()
        if rng.random() < config.raw_pair_qa_share:
            q = order.pop()
            return RAW_PAIR_QA_TEMPLATE.format(a=p, b=q, na=coins[p], nb=coins[q])
        return fact_sentence(p, coins[p], rng, config.raw_qa_share, config.marked_fact_share)

    corpus: list[str] = []
    doc: list[str] = []
    words = 0
    while len(corpus) < config.corpus_docs:
        s = next_sentence()
        n = len(s.split())
        if doc and words + n > config.doc_words:
            corpus.append(" ".join(doc))
            doc, words = [], 0
        doc.append(s)
        words += n
    tune = sample_questions(tune_people, coins, config.tune_examples, config.pair_share, rng)
    heldout = sample_questions(heldout_people, coins, config.eval_questions, config.pair_share, rng)
    return World(config, coins, tuple(tune_people), tuple(heldout_people), tuple(corpus), tuple(tune),
                 tuple(heldout))
