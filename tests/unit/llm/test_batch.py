"""The Batch API client against the stand-in over real HTTP: upload, create, find by metadata, poll, download,
and how each kind of output line reads (answers, failed items, expired items, answers outside the labels)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from consumer.config import LlmConfig
from consumer.errors import AuthFailedError
from consumer.llm.batch import BatchApi, BatchInfo, parse_results, request_file, request_line
from consumer.llm.client import LlmClient
from consumer.llm.prompting import Prompt, build_prompt
from consumer.sandbox.standin import Faults, StandinConfig, StandinServer

pytestmark = pytest.mark.timeout(20)

PROBS = {"negative": 0.4, "positive": 0.6}


def prompts(count: int) -> list[tuple[str, Prompt]]:
    return [(f"reviews.deferred:0:{n}", build_prompt(f"review number {n}", PROBS, "s4l")) for n in range(count)]


@pytest.fixture
async def standin() -> AsyncIterator[StandinServer]:
    server = StandinServer(StandinConfig(faults=Faults(batch_turnaround_s=0.3)))
    async with server:
        yield server


async def until_terminal(api: BatchApi, batch_id: str) -> BatchInfo:
    for _ in range(200):
        info = await api.get(batch_id)
        if info.terminal:
            return info
        await asyncio.sleep(0.05)  # polling a provider is how its batches are followed
    raise AssertionError(f"batch {batch_id} never ended")


def test_request_lines_carry_the_online_body() -> None:
    client = LlmClient(LlmConfig(model="gpt-4o-mini"))
    [(custom_id, prompt)] = prompts(1)
    line = orjson.loads(request_line(custom_id, client.request_body(prompt)))
    assert line == {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": client.request_body(prompt),
    }
    assert line["body"]["model"] == "gpt-4o-mini" and line["body"]["messages"] == list(prompt.messages)


async def test_a_batch_round_trip_is_found_by_metadata_and_answered(standin: StandinServer) -> None:
    config = LlmConfig(base_url=standin.url)
    pairs = prompts(5)
    async with BatchApi(config) as api:
        file_id = await api.upload(request_file(LlmClient(config), pairs), "in.jsonl")
        created = await api.create(file_id, {"shunt_key": "k1", "shunt_group": "g"})
        assert created.status == "validating" and created.total == 5
        await api.create(await api.upload(request_file(LlmClient(config), pairs[:1]), "x.jsonl"), {"shunt_key": "k2"})
        found = await api.find({"shunt_key": "k1"})
        assert [b.id for b in found] == [created.id]
        done = await until_terminal(api, created.id)
        assert done.status == "completed" and done.completed == 5 and done.error_file_id is None
        assert done.output_file_id is not None
        results = parse_results(await api.content(done.output_file_id), {c: p.allowed_labels for c, p in pairs})
    assert sorted(results) == sorted(c for c, _ in pairs)
    assert all(r.label == "negative" and r.usage is not None and r.error is None for r in results.values())
    stats = standin.stats()
    assert stats["batches_created"] == 2 and stats["batch_requests"] == 6
    assert stats["batch_duplicates"] == 1  # the second batch held a request the first had
    assert stats["answered"] == 0  # batch answers are not chat answers


async def test_listing_pages_with_after(standin: StandinServer) -> None:
    config = LlmConfig(base_url=standin.url)
    async with BatchApi(config) as api:
        file_id = await api.upload(request_file(LlmClient(config), prompts(1)), "in.jsonl")
        made = [await api.create(file_id, {"shunt_key": str(n)}) for n in range(105)]
        listed = [b.id async for b in api.batches()]
    assert listed == [b.id for b in reversed(made)]


async def test_failed_and_expired_items_read_as_errors(standin: StandinServer) -> None:
    config = LlmConfig(base_url=standin.url)
    standin.control(batch_item_failure_rate=0.5, batch_expire_rate=0.3)
    pairs = prompts(40)
    allowed = {c: p.allowed_labels for c, p in pairs}
    async with BatchApi(config) as api:
        created = await api.create(await api.upload(request_file(LlmClient(config), pairs), "in.jsonl"), {})
        done = await until_terminal(api, created.id)
        assert done.status == "expired" and done.error_file_id is not None and done.output_file_id is not None
        results = parse_results(await api.content(done.output_file_id), allowed)
        results |= parse_results(await api.content(done.error_file_id), allowed)
    assert sorted(results) == sorted(allowed)
    errors = [r.error for r in results.values() if r.error is not None]
    assert "batch_expired" in errors and "http_500" in errors
    assert done.completed + done.failed == 40 == done.total
    stats = standin.stats()
    assert stats["batch_items_expired"] + stats["batch_items_failed"] == done.failed


async def test_a_failed_batch_and_a_cancelled_one_end_without_output(standin: StandinServer) -> None:
    config = LlmConfig(base_url=standin.url)
    async with BatchApi(config) as api:
        file_id = await api.upload(request_file(LlmClient(config), prompts(3)), "in.jsonl")
        standin.control(batch_failure_rate=1.0)
        failed = await until_terminal(api, (await api.create(file_id, {})).id)
        standin.control(batch_failure_rate=0.0, batch_turnaround_s=60.0)
        cancelled = await api.cancel((await api.create(file_id, {})).id)
    assert failed.status == "failed" and failed.output_file_id is None
    assert cancelled.status == "cancelled" and cancelled.error_file_id is not None


def test_answers_outside_the_labels_and_bad_lines_are_errors() -> None:
    good = {"choices": [{"message": {"content": '{"label": "neutral"}'}}], "usage": {"prompt_tokens": 9,
            "completion_tokens": 2}}  # fmt: skip
    raw = (
        b"".join(
            [
                orjson.dumps({"custom_id": "a", "response": {"status_code": 200, "body": good}, "error": None}),
                b"not json",
                orjson.dumps({"custom_id": "b", "response": {"status_code": 200, "body": {"x": 1}}, "error": None}),
                orjson.dumps({"custom_id": "c", "response": None, "error": {"code": "batch_expired"}}),
                orjson.dumps({"custom_id": "zzz", "response": None, "error": {"code": "batch_expired"}}),
            ]
        )
        .replace(b"}not json{", b"}\nnot json\n{")
        .replace(b"}{", b"}\n{")
    )
    results = parse_results(raw, {"a": ("negative", "positive"), "b": ("negative",), "c": ("negative",)})
    assert results["a"].error == "invalid_answer" and results["a"].usage is not None
    assert results["b"].error == "malformed_response"
    assert results["c"].error == "batch_expired"
    assert set(results) == {"a", "b", "c"}


async def test_a_wrong_key_is_an_auth_failure() -> None:
    assert "sk-wrong" not in repr(BatchApi(LlmConfig(api_key="sk-wrong-key-123")))
    server = StandinServer(StandinConfig(api_key="sk-right"))
    async with server as url, BatchApi(LlmConfig(base_url=url, api_key="sk-wrong-key-123")) as api:
        with pytest.raises(AuthFailedError) as caught:
            await api.upload(b"{}\n", "in.jsonl")
    assert "sk-wrong" not in str(caught.value)
