"""Costs reconcile: every answer the LLM billed counts in cost_usd, whatever became of the review (issue 15).

The service runs as a real subprocess with ``router.fallback = "dlq"`` against the stand-in, which answers
30 % of the requests outside the offered labels (invalid answers, still billed). The final metrics message's
``totals.cost_usd`` must equal the stand-in's own token counts times the price, to 1e-9.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from consumer.config import LlmConfig
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

REVIEWS = 300


@pytest.fixture
def lying_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "1-5", "--out-of-set-rate", "0.3")
    yield url
    proc.kill()


def test_with_fallback_dlq_the_billed_cost_of_invalid_answers_counts(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, lying_llm: str
) -> None:
    settings = {
        "topics__input": topics.make("in"), "topics__output": topics.make("out"), "topics__dlq": topics.make("dlq"),
        "topics__distill": topics.make("distill"), "topics__metrics": topics.make("metrics"),
        "kafka__group_id": kafka.unique("g"), "llm__base_url": lying_llm, "llm__rpm": 1_000_000,
        "llm__tpm": 1_000_000_000, "router__threshold": 1.0, "router__fallback": "dlq",
    }  # fmt: skip
    rows = [r.as_dict() for r in generate(REVIEWS, seed=21, prefix="cost")]
    kafka.produce_reviews(settings["topics__input"], rows)
    proc = start_service(tmp_path / "service.log", "--max-messages", str(REVIEWS), **settings)
    assert proc.wait(120) == 0, proc.log()[-3000:]
    final = kafka.read_until(
        settings["topics__metrics"], lambda ms: any(orjson.loads(m.value())["final"] for m in ms), 60
    )
    totals = orjson.loads(final[-1].value())["totals"]
    seen = stats(lying_llm)
    price = LlmConfig().price()  # the stand-in model's price
    billed = (seen["prompt_tokens"] * price.input_per_mtok + seen["completion_tokens"] * price.output_per_mtok) / 1e6
    report(
        f"fallback=dlq, 30% invalid answers: cost_usd {totals['cost_usd']:.9f} vs stand-in billed {billed:.9f}, "
        f"{seen['out_of_set_sent']} invalid answers, {totals['dlq']} dead letters, {seen['requests']} requests"
    )
    assert seen["out_of_set_sent"] > 0 and totals["dlq"] == seen["out_of_set_sent"]
    assert totals["labeled"] + totals["dlq"] == REVIEWS
    assert totals["cost_usd"] == pytest.approx(billed, abs=1e-9, rel=0)
