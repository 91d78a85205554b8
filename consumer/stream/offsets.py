"""Per-partition completion tracking: messages finish out of order, offsets are stored in order.

For each assigned partition the tracker keeps the offsets read, in read order, and which are done. The
watermark (the offset to store: the next one to read after a restart) is the first offset not yet done,
or one past the last read when all are done. It never goes backwards.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from consumer.records import TopicPartition


@dataclass
class _Partition:
    pending: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    last_read: int = -1
    stored: int = -1  # the watermark last handed out for storing

    def watermark(self) -> int | None:
        if self.pending:
            return self.pending[0]
        return self.last_read + 1 if self.last_read >= 0 else None

    def settle(self) -> None:
        while self.pending and self.pending[0] in self.done:
            self.done.discard(self.pending.popleft())


class OffsetTracker:
    """Tracks read and done offsets for the partitions this consumer owns."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def assign(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self._parts.setdefault(tp, _Partition())

    def revoke(self, tps: list[TopicPartition]) -> None:
        """Forget partitions; late done-marks for them are ignored."""
        for tp in tps:
            self._parts.pop(tp, None)

    def owned(self) -> list[TopicPartition]:
        return list(self._parts)

    def read(self, tp: TopicPartition, offset: int) -> bool:
        """Record a message as read. False when the partition is not ours or the offset is old (a re-read)."""
        part = self._parts.get(tp)
        if part is None or offset <= part.last_read:
            return False
        part.pending.append(offset)
        part.last_read = offset
        return True

    def done(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None or not part.pending or offset < part.pending[0]:
            return
        part.done.add(offset)
        part.settle()

    def in_flight(self, tps: list[TopicPartition] | None = None) -> int:
        keys = self._parts if tps is None else [tp for tp in tps if tp in self._parts]
        return sum(len(self._parts[tp].pending) for tp in keys)

    def watermarks(self) -> dict[TopicPartition, int]:
        """The current watermark per owned partition, without marking it handed out (for lag metrics)."""
        return {tp: mark for tp, part in self._parts.items() if (mark := part.watermark()) is not None}

    def to_store(self, tps: list[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Watermarks that moved since last asked, for the given (default: all) partitions."""
        moved: dict[TopicPartition, int] = {}
        for tp in self._parts if tps is None else tps:
            part = self._parts.get(tp)
            mark = part.watermark() if part is not None else None
            if part is not None and mark is not None and mark > part.stored:
                part.stored = mark
                moved[tp] = mark
        return moved
