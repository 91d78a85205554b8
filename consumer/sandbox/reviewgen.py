"""Synthetic product reviews with known labels, written by this project (no third-party text).

Used by the demo, tests and benchmarks. Each review is built from phrase banks: a product, an opening,
several aspect sentences, and a verdict. Some are deliberately hard: mixed (praise then a damning
verdict, or the reverse) and sarcastic (positive words, negative meaning). Seeded, so repeatable.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

PRODUCTS = {
    "kitchen": ["kettle", "blender", "toaster", "chef's knife", "frying pan", "coffee grinder", "rice cooker"],
    "electronics": ["headphones", "phone charger", "router", "keyboard", "webcam", "portable speaker", "monitor"],
    "books": ["novel", "cookbook", "biography", "travel guide", "thriller", "history book", "poetry collection"],
    "outdoors": ["tent", "hiking boots", "water bottle", "camping stove", "backpack", "sleeping bag", "headlamp"],
}
OPENINGS = {
    "positive": [
        "I bought this {p} a month ago and I am delighted with it.",
        "This {p} has exceeded every expectation I had.",
        "After reading about it for weeks I finally got the {p}, and I'm glad I did.",
        "What a fantastic {p}.",
        "I have owned many a {p} over the years and this is the best one yet.",
    ],
    "negative": [
        "I bought this {p} a month ago and I regret it.",
        "This {p} was a complete disappointment from day one.",
        "I had high hopes for the {p}, but it let me down badly.",
        "What a waste of money this {p} turned out to be.",
        "I have owned many a {p} over the years and this is the worst one yet.",
    ],
}
ASPECTS = {
    "positive": [
        "The build quality is excellent and it feels solid in the hand.",
        "It works exactly as described, every single time.",
        "Setup took two minutes and the instructions were clear.",
        "It is well worth the price; I would happily pay more.",
        "Customer service answered my question within an hour and were very helpful.",
        "My whole family loves it and uses it every day.",
        "The design is elegant and it looks great on the shelf.",
        "It arrived early, well packed, and in perfect condition.",
        "Even after heavy use it still performs like new.",
        "It is reliable, quiet and a pleasure to use.",
    ],
    "negative": [
        "The build quality is poor and it feels cheap and flimsy.",
        "It stopped working after two weeks and would not turn back on.",
        "The instructions were useless and setup took an entire evening.",
        "It is overpriced for what you get; save your money.",
        "Customer service ignored three emails and never offered a refund.",
        "It broke the first time my kids touched it.",
        "The design is ugly and awkward, with sharp edges everywhere.",
        "It arrived late, badly packed, and with a cracked case.",
        "After a few uses it already performs terribly.",
        "It is unreliable, noisy and frustrating to use.",
    ],
}
VERDICTS = {
    "positive": [
        "Highly recommended.",
        "Five stars, I would buy it again without hesitation.",
        "I recommend it to anyone looking for a good {p}.",
        "Great product, great value.",
    ],
    "negative": [
        "Not recommended.",
        "One star, and I am returning it.",
        "Avoid this {p}; look elsewhere.",
        "Terrible product, terrible value.",
    ],
}
SARCASM = [
    "Oh wonderful, the {p} died the day after the warranty ended. Exactly what I hoped for.",
    "Brilliant engineering: the {p} needs a rest after every five minutes of use. Just great.",
    "Five stars for teaching me patience, because the {p} fails about every other day.",
    "Love how the {p} makes a grinding noise and smells of burnt plastic. Truly a premium experience.",
]
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class SyntheticReview:
    id: str
    text: str
    label: str
    domain: str
    hard: bool

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "label": self.label, "domain": self.domain, "hard": self.hard}


def _other(label: str) -> str:
    return LABELS[1 - LABELS.index(label)]


def _plain(rnd: random.Random, label: str, product: str, sentences: int) -> str:
    parts = [rnd.choice(OPENINGS[label])]
    parts += rnd.sample(ASPECTS[label], k=min(sentences, len(ASPECTS[label])))
    parts.append(rnd.choice(VERDICTS[label]))
    return " ".join(parts).format(p=product)


def _mixed(rnd: random.Random, label: str, product: str, sentences: int) -> str:
    # Praise (or complaints) first, then a verdict the other way: the last word decides.
    lead = rnd.sample(ASPECTS[_other(label)], k=max(1, sentences // 2))
    turn = rnd.choice(["But", "However,", "That said,", "Still,"])
    tail = rnd.sample(ASPECTS[label], k=max(1, sentences - len(lead)))
    return " ".join([*lead, turn, tail[0][0].lower() + tail[0][1:], *tail[1:], rnd.choice(VERDICTS[label])]).format(
        p=product
    )


def generate(count: int, seed: int = 0, hard_share: float = 0.15, prefix: str = "syn") -> Iterator[SyntheticReview]:
    """``count`` reviews, balanced labels, about ``hard_share`` of them mixed or sarcastic."""
    rnd = random.Random(seed)
    domains = sorted(PRODUCTS)
    for index in range(count):
        label = LABELS[index % 2]
        domain = domains[rnd.randrange(len(domains))]
        product = rnd.choice(PRODUCTS[domain])
        sentences = rnd.choice([1, 2, 3, 4, 4, 5, 6, 8])
        hard = rnd.random() < hard_share
        if hard and label == "negative" and rnd.random() < 0.5:
            text = rnd.choice(SARCASM).format(p=product)
        elif hard:
            text = _mixed(rnd, label, product, sentences)
        else:
            text = _plain(rnd, label, product, sentences)
        yield SyntheticReview(f"{prefix}-{seed}-{index:07d}", text, label, domain, hard)
