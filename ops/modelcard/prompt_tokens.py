# ruff: noqa  (scratch: the experiments behind the model card, kept as run)
"""Prompt tokens per call (the documented estimate the stand-in bills), over the training split's reviews."""

import statistics

from consumer.offline import datasets
from consumer.llm import prompting

train, _ = datasets.split_amazon(datasets.load_amazon())
texts = [r["text"] for r in train]
probs = {"negative": 0.027, "positive": 0.973}
for name, kw in (
    ("plain", {"kind": "plain"}),
    ("s4l", {"kind": "s4l"}),
    ("s4l-nohint", {"kind": "s4l", "hint": False}),
):
    counts = [prompting.count_prompt_tokens(prompting.build_prompt(t, probs, **kw).messages) for t in texts]
    review = [prompting.count_tokens(prompting.orjson.dumps(t).decode()) for t in texts]
    over = [c - r for c, r in zip(counts, review)]
    p = prompting.build_prompt("R", probs, **kw)
    print(
        f"{name:11s} {p.version:14s} mean {statistics.mean(counts):.1f} median {statistics.median(counts)} overhead(mean, beyond the review) {statistics.mean(over):.1f}"
    )
