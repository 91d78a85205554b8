"""DS+'s expected gain over the LLM alone by threshold, averaged over the stand-in oracle's draws.

`shunt eval` measures one draw of the oracle per seed; this computes the mean over all draws exactly: a review
the small model keeps scores 1 if its label is right, a review sent scores the oracle's probability of
answering right (0.8634 for 2-/4-star reviews, 0.99 for the rest, 94.5% overall on the test split). Cost is
the documented token estimate the stand-in bills: plain-v1 for the LLM alone, s4l-v2 for DS+, plus the reply.

    python -m ops.modelcard.expected_gain [--model models/shunt-sentiment]

It also prints, for budgets of 25/31/35% of the cost, the best confidence threshold (on a 0.0025 grid) against
routing by expected gain per token: send a review when (0.945 - confidence) / its S4L tokens is above a bar.
"""

from __future__ import annotations

import argparse

import numpy as np

from consumer.config import ModelConfig
from consumer.llm import prompting
from consumer.offline import datasets
from consumer.small.scoring import OnnxScorer

HARD, EASY = 0.8634, 0.99
REPLY_TOKENS = 8  # {"label": "positive"}: 6 tokens by the estimate, priced 4x an input token, rounded up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=ModelConfig().path)
    args = parser.parse_args()
    _, test = datasets.split_amazon(datasets.load_amazon())
    scorer = OnnxScorer.load(args.model, max_tokens=ModelConfig().max_tokens)
    predictions = [p for i in range(0, len(test), 128) for p in scorer.predict([r["text"] for r in test[i : i + 128]])]
    confidence = np.array([p.confidence for p in predictions])
    right = np.array([p.label == r["label"] for p, r in zip(predictions, test, strict=True)], dtype=float)
    oracle = np.array([HARD if r["rating"] in (2, 4) else EASY for r in test])
    plain = np.array([_tokens(r["text"], p.probs, "plain") for r, p in zip(test, predictions, strict=True)])
    s4l = np.array([_tokens(r["text"], p.probs, "s4l") for r, p in zip(test, predictions, strict=True)])
    print(f"{len(test)} reviews; LLM alone expected {oracle.mean():.2%}; small alone {right.mean():.2%}")
    print("tau   sent   DS+ cost  expected DS+ accuracy  gain over the LLM alone (points)")
    for tau in np.round(np.arange(0.70, 0.951, 0.01), 2):
        sent = confidence < tau
        accuracy = np.where(sent, oracle, right).mean()
        cost = (s4l * sent).sum() / plain.sum()
        print(f"{tau:.2f}  {sent.mean():5.1%}  {cost:7.1%}  {accuracy:20.2%}  {100 * (accuracy - oracle.mean()):+.2f}")
    by_confidence = [confidence < tau for tau in np.arange(0.5, 1.0, 0.0025)]
    value = (0.945 - confidence) / s4l
    by_value = [value > bar for bar in np.quantile(value, np.linspace(0, 1, 800))]
    for budget in (0.25, 0.31, 0.35):
        for name, masks in (("confidence threshold", by_confidence), ("gain per token", by_value)):
            gain, cost = _best_within(masks, budget, oracle, right, s4l, plain.sum())
            print(f"budget {budget:.0%}: {name:20s} {gain:+.2f} points at {cost:.1%}")


def _best_within(
    masks: list[np.ndarray], budget: float, oracle: np.ndarray, right: np.ndarray, s4l: np.ndarray, baseline: float
) -> tuple[float, float]:
    best = (-100.0, 0.0)
    for sent in masks:
        cost = float((s4l * sent).sum() / baseline)
        gain = 100 * float(np.where(sent, oracle, right).mean() - oracle.mean())
        if cost <= budget and gain > best[0]:
            best = (gain, cost)
    return best


def _tokens(text: str, probs: dict[str, float], kind: prompting.PromptKind) -> int:
    return prompting.count_prompt_tokens(prompting.build_prompt(text, probs, kind).messages) + REPLY_TOKENS


if __name__ == "__main__":
    main()
