# ruff: noqa  (scratch: the experiments behind the model card, kept as run)
"""End-to-end scorer speed of several model folders, interleaved, in CPU time and wall time.

    nice -n 10 .venv/bin/python -m ops.modelcard.speed_ratio DIR:MAXTOK [DIR:MAXTOK ...]

CPU time (time.process_time, one intra-op thread) is far less sensitive than wall time to other
processes on a loaded 2-core machine; the ratio to the first model is what matters.
"""

import statistics
import sys
import time
from pathlib import Path

from ops.bench.scorer import review_texts

from consumer import logs
from consumer.small.scoring import OnnxScorer

logs.configure("warning")
specs = [a.rsplit(":", 1) for a in sys.argv[1:]]
scorers = [OnnxScorer.load(Path(d), max_tokens=int(m), intra_op_threads=1) for d, m in specs]
texts, _ = review_texts(4096)
repeats = 5
for size in (1, 32, 128):
    count = 1024 if size == 1 else len(texts)
    batches = [texts[i : i + size] for i in range(0, count - size + 1, size)]
    n = len(batches) * size
    for s in scorers:
        for b in batches:
            s.predict(b)
    cpu = {i: [] for i in range(len(scorers))}
    wall = {i: [] for i in range(len(scorers))}
    for _ in range(repeats):
        for i, s in enumerate(scorers):
            c0, w0 = time.process_time(), time.perf_counter()
            for b in batches:
                s.predict(b)
            cpu[i].append(n / (time.process_time() - c0))
            wall[i].append(n / (time.perf_counter() - w0))
    base = statistics.median(cpu[0])
    for i, (d, m) in enumerate(specs):
        c, w = statistics.median(cpu[i]), statistics.median(wall[i])
        print(
            f"batch {size:4d} {d}:{m}  cpu-rate {c:9,.0f}/s ({c / base:.3f} of first)  wall-rate {w:9,.0f}/s",
            flush=True,
        )
