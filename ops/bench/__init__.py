"""The benchmarks: the service measured against the real Kafka, built on consumer.kafka (admin, reader).
Run each from the repository root as ``python -m ops.bench.<name>``; BENCHMARKS.md has the commands and figures."""
