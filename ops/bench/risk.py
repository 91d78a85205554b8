"""The risk-controlled threshold's guarantee, checked on real held-out reviews (issue 19's offline acceptance).

The Amazon test split (never trained on) is split in two, seeded: tau comes from the calibration half with
``--max-error``; the small path's realised error is measured on the other half. The same is done for 1,000
bootstrap resamples of the calibration half: the share of resamples whose tau keeps the realised error
within ``max_error`` should be at least ``risk_confidence``.

    .venv/bin/python -m ops.bench.risk [--max-error 0.03] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

from consumer.config import DEFAULT_MODEL_DIR
from consumer.offline.datasets import load_amazon, split_amazon
from consumer.small.scoring import OnnxScorer
from consumer.stream.risk import risk_threshold
from ops.bench.report import console, write_json


def _realised(conf: Sequence[float], ok: Sequence[bool], tau: float | None) -> tuple[float, float]:
    """(error among kept, share sent to the LLM) at ``tau`` (None: everything is sent, no error)."""
    kept = [o for c, o in zip(conf, ok, strict=True) if tau is not None and c >= tau]
    error = 1 - sum(kept) / len(kept) if kept else 0.0
    return error, 1 - len(kept) / len(conf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-error", type=float, default=0.03)
    parser.add_argument("--risk-confidence", type=float, default=0.95)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()

    _train, test = split_amazon(load_amazon())
    scorer = OnnxScorer.load(DEFAULT_MODEL_DIR)
    predictions = scorer.predict([str(row["text"]) for row in test])
    pairs = [(p.confidence, p.label == row["label"]) for p, row in zip(predictions, test, strict=True)]
    random.Random(args.seed).shuffle(pairs)
    half = len(pairs) // 2
    cal, held = pairs[:half], pairs[half:]
    held_conf, held_ok = [c for c, _ in held], [o for _, o in held]

    def tau_of(sample: Sequence[tuple[float, bool]]) -> float | None:
        return risk_threshold(
            [c for c, _ in sample], [o for _, o in sample], args.max_error, args.risk_confidence
        ).threshold

    tau = tau_of(cal)
    error, share = _realised(held_conf, held_ok, tau)
    rng = random.Random(args.seed + 1)
    within, shares, none = 0, [], 0
    for _ in range(args.resamples):
        boot_tau = tau_of([cal[rng.randrange(half)] for _ in range(half)])
        none += boot_tau is None
        boot_error, boot_share = _realised(held_conf, held_ok, boot_tau)
        within += boot_error <= args.max_error
        shares.append(boot_share)
    result = {
        "reviews": {"calibration": len(cal), "held_out": len(held)},
        "max_error": args.max_error,
        "risk_confidence": args.risk_confidence,
        "tau": tau,
        "held_out_error": error,
        "held_out_share_to_llm": share,
        "resamples": args.resamples,
        "resamples_within_max_error": within / args.resamples,
        "resamples_certifying_nothing": none,
        "mean_share_to_llm": sum(shares) / len(shares),
        "model": scorer.version,
    }
    write_json("risk", result)
    console.print(result)


if __name__ == "__main__":
    main()
