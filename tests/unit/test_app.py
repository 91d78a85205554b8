"""The service's wiring: the scoring hop gets the configured workers, each scoring on its own model replica."""

from __future__ import annotations

import pytest

from consumer.app import scoring_stage
from consumer.config import Settings
from consumer.sandbox.reviewgen import generate
from consumer.small.scoring import ScoringStage

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_the_scoring_stage_has_the_configured_workers(workers: int) -> None:
    stage = scoring_stage(Settings(model={"workers": workers}))
    try:
        assert isinstance(stage, ScoringStage) and stage.workers == workers
        reviews = list(generate(64, seed=3))
        scored = await stage.score(reviews)
        assert [s.review.id for s in scored] == [r.id for r in reviews]
    finally:
        stage.close()


def test_the_default_is_two_workers() -> None:
    stage = scoring_stage(Settings())
    stage.close()
    assert stage.workers == 2
