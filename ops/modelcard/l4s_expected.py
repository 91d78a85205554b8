"""DS+'s expected accuracy on one domain's test split at a threshold, for model folders before and after L4S.

A review the model keeps scores 1 if its label is right; a review sent scores the stand-in oracle's probability
of answering right (0.8634 for 2-/4-star reviews, 0.99 for the rest), so no oracle draw adds noise.

    python -m ops.modelcard.l4s_expected kitchen /tmp/l4s/base3 /tmp/l4s/models/<version> [--threshold 0.9]
"""

from __future__ import annotations

import argparse

import numpy as np

from consumer.config import ModelConfig
from consumer.offline import datasets
from consumer.small.scoring import OnnxScorer

HARD, EASY = 0.8634, 0.99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    _, test = datasets.split_amazon(datasets.load_amazon(None, [args.domain]))
    oracle = np.array([HARD if r["rating"] in (2, 4) else EASY for r in test])
    texts = [r["text"] for r in test]
    print(f"{args.domain}: {len(test)} test reviews, LLM alone expected {oracle.mean():.2%}")
    for folder in args.models:
        scorer = OnnxScorer.load(folder, max_tokens=ModelConfig().max_tokens)
        predictions = [p for i in range(0, len(texts), 128) for p in scorer.predict(texts[i : i + 128])]
        right = np.array([p.label == r["label"] for p, r in zip(predictions, test, strict=True)], dtype=float)
        sent = np.array([p.confidence < args.threshold for p in predictions])
        expected = np.where(sent, oracle, right).mean()
        print(f"{scorer.version}: sent {sent.mean():.2%}, expected DS+ accuracy {expected:.2%}")


if __name__ == "__main__":
    main()
