"""The stand-in provider over real HTTP: policies, its own limits, injected faults, counters, the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner

from consumer.commands.llm_standin import command
from consumer.llm.prompting import build_prompt
from consumer.sandbox.standin import (
    Faults,
    LabelBook,
    OraclePolicy,
    ReplayPolicy,
    StandinConfig,
    StandinServer,
    go_duration,
    parse_latency,
)

pytestmark = pytest.mark.timeout(15)

PROBS = {"negative": 0.5, "positive": 0.5}


def body(text: str, probs: dict[str, float] = PROBS, max_completion_tokens: int = 20) -> dict[str, Any]:
    prompt = build_prompt(text, probs, "s4l")
    return {
        "model": "standin",
        "messages": list(prompt.messages),
        "max_completion_tokens": max_completion_tokens,
    }


def write_labels(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, data: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], Any]:
    async with http.post(f"{url}/chat/completions", data=orjson.dumps(data), headers=headers) as response:
        raw = await response.read()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = raw
        return response.status, dict(response.headers), parsed


def answer(doc: dict[str, Any]) -> str:
    label: str = orjson.loads(doc["choices"][0]["message"]["content"])["label"]
    return label


async def test_replay_matches_by_normalised_text_then_by_id(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    labels = write_labels(
        tmp_path / "l.jsonl",
        [{"text": "Great   KETTLE ", "label": "positive"}, {"id": "r9", "label": "negative"}],
    )
    async with StandinServer(StandinConfig(policy="replay", labels=labels)) as url:
        _, _, doc = await post(http, url, body("great kettle"))
        assert answer(doc) == "positive"
        _, _, doc = await post(http, url, body("something else"), **{"X-Review-Id": "r9"})
        assert answer(doc) == "negative"
        status, _, doc = await post(http, url, body("unknown review"))
        assert status == 200 and answer(doc) == "negative"  # the first offered label, counted as unmatched
        _, _, stats = await get_stats(http, url)
    assert stats["unmatched"] == 1 and stats["answered"] == 3


async def get_stats(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], Any]:
    async with http.get(url.removesuffix("/v1") + "/stats") as response:
        return response.status, dict(response.headers), orjson.loads(await response.read())


def test_oracle_is_right_at_the_configured_rate_repeatably_and_wrong_within_the_offer() -> None:
    rows = [{"text": f"review {i}", "label": "positive", "hard": i % 2 == 0} for i in range(2000)]
    policy = OraclePolicy(LabelBook(rows), accuracy=0.9, hard_accuracy=0.5, seed=1)
    offered = ("negative", "neutral", "positive")
    easy = [policy.answer(f"review {i}", None, offered) for i in range(1, 2000, 2)]
    hard = [policy.answer(f"review {i}", None, offered) for i in range(0, 2000, 2)]
    assert 0.86 <= easy.count("positive") / len(easy) <= 0.94
    assert 0.44 <= hard.count("positive") / len(hard) <= 0.56
    assert set(easy + hard) <= set(offered)
    assert [policy.answer(f"review {i}", None, offered) for i in range(1, 2000, 2)] == easy  # seeded by text
    # The true label was pruned away: the oracle can only pick among what was offered.
    assert policy.answer("review 1", None, ("negative", "neutral")) in ("negative", "neutral")


def test_replay_answers_what_the_file_says() -> None:
    policy = ReplayPolicy(LabelBook([{"id": "a", "text": "x", "label": "neutral"}]))
    assert policy.answer("X ", None, ("negative", "positive")) == "neutral"
    assert policy.answer("y", "a", ("negative",)) == "neutral"
    assert policy.answer("y", "b", ("negative",)) is None


async def test_own_rpm_limit_answers_429_with_headers_and_counts_early_requests(
    http: aiohttp.ClientSession,
) -> None:
    async with StandinServer(StandinConfig(faults=Faults(rpm=2))) as url:
        first = await post(http, url, body("a"))
        second = await post(http, url, body("b"))
        third = await post(http, url, body("c"))
        fourth = await post(http, url, body("d"))  # sent before the Retry-After it was given
        _, _, stats = await get_stats(http, url)
    assert first[0] == 200 and first[1]["x-ratelimit-remaining-requests"] == "1"
    assert second[1]["x-ratelimit-remaining-requests"] == "0"
    status, headers, doc = third
    assert status == 429 and doc["error"]["code"] == "rate_limit_exceeded"
    assert 59 <= int(headers["Retry-After"]) <= 60 and 58_000 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-reset-requests"].endswith("s")
    assert fourth[0] == 429
    assert stats["rate_limited_sent"] == 2 and stats["early_requests"] == 1
    assert stats["max_requests_in_any_60s_window"] == 4 and stats["answered"] == 2


async def test_own_tpm_limit(http: aiohttp.ClientSession) -> None:
    async with StandinServer(StandinConfig(faults=Faults(tpm=300))) as url:
        ok = await post(http, url, body("a", max_completion_tokens=20))
        limited = await post(http, url, body("b", max_completion_tokens=200))
    assert ok[0] == 200 and int(ok[1]["x-ratelimit-remaining-tokens"]) < 300
    assert limited[0] == 429 and "x-ratelimit-reset-tokens" in limited[1]


async def test_usage_is_reported_and_bodies_are_kept_bounded(http: aiohttp.ClientSession) -> None:
    async with StandinServer(StandinConfig(keep_bodies=3)) as url:
        for i in range(5):
            _, _, doc = await post(http, url, body(f"review {i}"))
        _, _, stats = await get_stats(http, url)
    usage = doc["usage"]
    assert usage["prompt_tokens"] > 50 and usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert stats["prompt_tokens"] >= 5 * 50
    assert [b["messages"][1]["content"].endswith(f'"review {i}","allowed_labels":["negative","positive"],"hint"'
            ':{"negative":0.5,"positive":0.5}}')
            for i, b in zip(range(2, 5), stats["recent_requests"], strict=True)] == [True] * 3  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "counter"),
    [
        ("error_rate", "errors_injected"),
        ("malformed_rate", "malformed_sent"),
        ("out_of_set_rate", "out_of_set_sent"),
    ],
)
async def test_faults_can_be_switched_at_run_time(http: aiohttp.ClientSession, fault: str, counter: str) -> None:
    async with StandinServer(StandinConfig()) as url:
        async with http.post(url.removesuffix("/v1") + "/control", data=orjson.dumps({fault: 1.0})) as response:
            assert response.status == 200
        status, _, doc = await post(http, url, body("a"))
        _, _, stats = await get_stats(http, url)
    assert stats[counter] == 1
    if fault == "error_rate":
        assert status in (500, 502, 503)
    elif fault == "out_of_set_rate":
        assert answer(doc) not in PROBS
    else:
        assert status == 200 and not (isinstance(doc, dict) and "usage" in doc and "choices" in doc)


async def test_a_timeout_holds_the_request_for_hang_s(http: aiohttp.ClientSession) -> None:
    async with StandinServer(StandinConfig(faults=Faults(timeout_rate=1.0, hang_s=0.2))) as url:
        status, _, _ = await post(http, url, body("a"))
        _, _, stats = await get_stats(http, url)
    assert status == 504 and stats["timeouts_injected"] == 1


async def test_a_storm_answers_429_for_n_requests_then_recovers(http: aiohttp.ClientSession) -> None:
    server = StandinServer(StandinConfig())
    async with server as url:
        server.control(storm={"requests": 2, "retry_after_s": 2})
        results = [await post(http, url, body(text)) for text in ("a", "b")]
        server.control(storm={"requests": 0})
        ok = await post(http, url, body("c"))
        stats = server.stats()
    assert [r[0] for r in results] == [429, 429]
    assert results[0][1]["Retry-After"] == "2" and "retry-after-ms" not in results[0][1]
    assert ok[0] == 200
    assert stats["rate_limited_sent"] == 2 and stats["early_requests"] == 2  # b and c came inside the 2 s


async def test_bad_control_and_bad_requests_are_400(http: aiohttp.ClientSession) -> None:
    async with StandinServer(StandinConfig()) as url:
        root = url.removesuffix("/v1")
        for bad in ({"nonsense": 1}, {"error_rate": 2.0}, {"storm": 3}):
            async with http.post(root + "/control", data=orjson.dumps(bad)) as response:
                assert response.status == 400
        async with http.post(url + "/chat/completions", data=b"not json") as response:
            assert response.status == 400


async def test_a_required_key_is_checked(http: aiohttp.ClientSession) -> None:
    async with StandinServer(StandinConfig(api_key="sk-right")) as url:
        assert (await post(http, url, body("a"), Authorization="Bearer sk-right"))[0] == 200
        status, _, doc = await post(http, url, body("a"), Authorization="Bearer sk-wrong")
    assert status == 401 and "sk-wrong" in doc["error"]["message"]


async def test_foreign_prompts_use_the_json_schema_enum(http: aiohttp.ClientSession) -> None:
    foreign = {
        "messages": [{"role": "user", "content": "Sentiment of: lovely"}],
        "response_format": {"json_schema": {"schema": {"properties": {"label": {"enum": ["pos", "neg"]}}}}},
    }
    async with StandinServer(StandinConfig()) as url:
        _, _, doc = await post(http, url, foreign)
    assert answer(doc) == "pos"


def test_label_book_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        LabelBook.load(path)
    with pytest.raises(ValueError, match="label row 1"):
        LabelBook([{"label": "x"}])


def test_config_and_flag_parsing_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="needs a label file"):
        StandinConfig(policy="replay")
    with pytest.raises(ValueError, match="add up"):
        Faults(error_rate=0.6, timeout_rate=0.6)
    assert parse_latency("200-800") == (200.0, 800.0) and parse_latency("5") == (5.0, 5.0)
    with pytest.raises(ValueError):
        parse_latency("800-200")
    assert (go_duration(0.25), go_duration(1.5), go_duration(360.0)) == ("250ms", "1.5s", "6m0s")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "replay"], "needs a label file"),
        (["--latency-ms", "fast"], "LO-HI"),
        (["--error-rate", "0.7", "--timeout-rate", "0.7"], "add up"),
        (["--accuracy", "1.5"], "1.5"),
    ],
)
def test_cli_rejects_bad_flags(args: list[str], message: str) -> None:
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2
    assert message in result.output


def test_cli_help() -> None:
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0 and "--out-of-set-rate" in result.output
