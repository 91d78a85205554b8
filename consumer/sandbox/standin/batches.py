"""The stand-in's files and batches endpoints: OpenAI's Batch API with a turnaround you choose.

``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches`` (newest first; ``limit``, ``after``, ``has_more``), ``GET /v1/batches/{id}`` and
``POST /v1/batches/{id}/cancel``. A batch moves validating -> in_progress -> finalizing -> completed over
``batch_turnaround_s`` (checked when it is looked at, so nothing runs in the background). Faults, changeable
with ``POST /control``: ``batch_failure_rate`` (the whole batch fails validation), ``batch_item_failure_rate``
(a request answered with a 500 in the error file) and ``batch_expire_rate`` (requests left undone when the
window closes: the batch ends ``expired`` and they are in the error file as ``batch_expired``).

Counters for ``/stats``: batches created, the requests in them, and duplicates (a ``custom_id`` already
seen in an earlier batch: a review paid for twice).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from consumer.sandbox.standin import wire

BATCH_COUNTERS = (
    "files_uploaded", "batches_created", "batch_requests", "batch_duplicates", "batches_completed",
    "batches_expired", "batches_failed", "batches_cancelled", "batch_answered", "batch_items_failed",
    "batch_items_expired", "batch_prompt_tokens", "batch_completion_tokens",
)  # fmt: skip
_ENDPOINT = "/v1/chat/completions"
_TERMINAL = ("completed", "failed", "expired", "cancelled")
_VALIDATING, _FINALIZING = 0.1, 0.9  # shares of the turnaround spent validating, and before finalizing
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answerer = Callable[[Mapping[str, Any]], tuple[int, dict[str, Any]]]
"""Answers one chat body as the chat endpoint would: (status, response body)."""


@dataclass
class _Batch:
    id: str
    input_file_id: str
    metadata: dict[str, str]
    lines: list[dict[str, Any]]
    created: float  # monotonic
    created_at: int  # unix seconds
    turnaround_s: float
    rates: tuple[float, float, float]  # batch failure, item failure, item expiry
    seed: int
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": _ENDPOINT, "errors": None,
            "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "metadata": self.metadata, "request_counts": dict(self.counts),
        }  # fmt: skip


class BatchDesk:
    """Holds uploaded files and batches in memory; counts into the app's ``/stats`` counters."""

    def __init__(
        self,
        counters: Callable[[], dict[str, int]],
        answer: Answerer,
        faults: Callable[[], Any],
        seed: int,
        authorised: Callable[[web.Request], bool] = lambda _request: True,
    ) -> None:
        self._counters = counters  # read each time: ``reset_stats`` replaces the dict
        self._authorised = authorised
        self._answer = answer
        self._faults = faults
        self._seed = seed
        self._files: dict[str, tuple[bytes, str]] = {}
        self._batches: dict[str, _Batch] = {}
        self._seen: set[str] = set()

    @property
    def counters(self) -> dict[str, int]:
        return self._counters()

    def reset(self) -> None:
        self._seen.clear()

    def routes(self, app: web.Application) -> None:
        guard = self._guarded
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/files", guard(self.upload))
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", guard(self.content))
            app.router.add_post(f"{prefix}/batches", guard(self.create))
            app.router.add_get(f"{prefix}/batches", guard(self.list))
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", guard(self.get))
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", guard(self.cancel))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._authorised(request):
                self.counters["auth_failures"] += 1
                return wire.error(401, "invalid_request_error", "Incorrect API key provided")
            return await handler(request)

        return guarded

    # -- files -----------------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch" or not isinstance(upload, web.FileField):
            return wire.error(400, "invalid_request_error", "expected multipart purpose=batch and a file")
        file_id = self._add_file(upload.file.read(), upload.filename)
        self.counters["files_uploaded"] += 1
        return wire.json_response(200, self._file_view(file_id))

    def _add_file(self, content: bytes, filename: str) -> str:
        file_id = f"file-standin-{len(self._files) + 1:06d}"
        self._files[file_id] = (content, filename)
        return file_id

    def _file_view(self, file_id: str) -> dict[str, Any]:
        content, filename = self._files[file_id]
        return {"id": file_id, "object": "file", "bytes": len(content), "filename": filename, "purpose": "batch",
                "created_at": int(time.time())}  # fmt: skip

    async def content(self, request: web.Request) -> web.Response:
        found = self._files.get(request.match_info["file_id"])
        if found is None:
            return wire.error(404, "invalid_request_error", "no such file")
        return web.Response(status=200, body=found[0], content_type="application/jsonl")

    # -- batches ---------------------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        body = await wire.read_json(request)
        found = self._files.get(str((body or {}).get("input_file_id")))
        if body is None or found is None or body.get("endpoint") != _ENDPOINT:
            return wire.error(400, "invalid_request_error", "expected an uploaded input_file_id and endpoint")
        try:
            lines = [orjson.loads(line) for line in found[0].splitlines() if line.strip()]
        except orjson.JSONDecodeError:
            return wire.error(400, "invalid_request_error", "the input file is not JSON lines")
        batch = self._new_batch(str(body["input_file_id"]), body.get("metadata") or {}, lines)
        return wire.json_response(200, batch.view())

    def _new_batch(self, file_id: str, metadata: Mapping[str, Any], lines: list[dict[str, Any]]) -> _Batch:
        faults = self._faults()
        batch = _Batch(
            id=f"batch_standin_{len(self._batches) + 1:06d}", input_file_id=file_id,
            metadata={str(k): str(v) for k, v in metadata.items()}, lines=lines, created=time.monotonic(),
            created_at=int(time.time()), turnaround_s=faults.batch_turnaround_s,
            rates=(faults.batch_failure_rate, faults.batch_item_failure_rate, faults.batch_expire_rate),
            seed=self._seed + len(self._batches),
        )  # fmt: skip
        batch.counts["total"] = len(lines)
        self._batches[batch.id] = batch
        ids = [str(line.get("custom_id")) for line in lines]
        self.counters["batches_created"] += 1
        self.counters["batch_requests"] += len(lines)
        self.counters["batch_duplicates"] += sum(1 for custom_id in ids if custom_id in self._seen)
        self._seen.update(ids)
        return batch

    async def get(self, request: web.Request) -> web.Response:
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return wire.error(404, "invalid_request_error", "no such batch")
        self._advance(batch)
        return wire.json_response(200, batch.view())

    async def list(self, request: web.Request) -> web.Response:
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
        newest = list(reversed(self._batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[:limit]
        for batch in page:
            self._advance(batch)
        data = [b.view() for b in page]
        return wire.json_response(200, {
            "object": "list", "data": data, "has_more": len(newest) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        })  # fmt: skip

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return wire.error(404, "invalid_request_error", "no such batch")
        self._advance(batch)
        if batch.status not in _TERMINAL:
            self._finish(batch, answered=0, status="cancelled")
        return wire.json_response(200, batch.view())

    # -- the lifecycle, advanced when looked at --------------------------------------------------------
    def _advance(self, batch: _Batch) -> None:
        if batch.status in _TERMINAL:
            return
        elapsed = time.monotonic() - batch.created
        turnaround = batch.turnaround_s
        rng = random.Random(batch.seed)
        if elapsed >= turnaround * _VALIDATING and rng.random() < batch.rates[0]:
            batch.status = "failed"
            self.counters["batches_failed"] += 1
        elif elapsed >= turnaround:
            expired = sum(1 for _ in batch.lines if rng.random() < batch.rates[2])
            self._finish(batch, answered=len(batch.lines) - expired, status="expired" if expired else "completed")
        else:
            batch.status = "in_progress" if elapsed < turnaround * _FINALIZING else "finalizing"
            if elapsed < turnaround * _VALIDATING:
                batch.status = "validating"

    def _finish(self, batch: _Batch, answered: int, status: str) -> None:
        """Answer the first ``answered`` lines (some fail on purpose); the rest end in the error file."""
        rng = random.Random(batch.seed + 1)
        outputs: list[bytes] = []
        errors: list[bytes] = []
        for number, line in enumerate(batch.lines):
            custom_id = line.get("custom_id")
            if number >= answered:
                left = "batch_expired" if status == "expired" else "batch_cancelled"
                errors.append(_line(custom_id, None, {"code": left, "message": "not done in time"}))
                if status == "expired":
                    self.counters["batch_items_expired"] += 1
            elif rng.random() < batch.rates[1]:
                errors.append(_line(custom_id, {"status_code": 500, "body": {"error": {"type": "server_error"}}}))
                self.counters["batch_items_failed"] += 1
            else:
                outputs.append(self._answered(custom_id, line.get("body")))
        batch.status = status
        batch.counts["completed"] = len(outputs)
        batch.counts["failed"] = len(errors)
        batch.output_file_id = self._add_file(b"".join(outputs), f"{batch.id}_output.jsonl") if outputs else None
        batch.error_file_id = self._add_file(b"".join(errors), f"{batch.id}_error.jsonl") if errors else None
        self.counters[f"batches_{status}"] += 1

    def _answered(self, custom_id: Any, body: Any) -> bytes:
        status, answer = self._answer(body if isinstance(body, dict) else {})
        if status == 200:
            self.counters["batch_answered"] += 1
            self.counters["batch_prompt_tokens"] += answer["usage"]["prompt_tokens"]
            self.counters["batch_completion_tokens"] += answer["usage"]["completion_tokens"]
        return _line(custom_id, {"status_code": status, "body": answer})


def _line(custom_id: Any, response: dict[str, Any] | None, error: dict[str, Any] | None = None) -> bytes:
    request_id = f"req_standin_{random.getrandbits(40):010x}"
    if response is not None:
        response = {"request_id": request_id, **response}
    doc = {"id": f"batch_req_{random.getrandbits(40):010x}", "custom_id": custom_id, "response": response,
           "error": error}  # fmt: skip
    return orjson.dumps(doc) + b"\n"
