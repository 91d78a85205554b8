#!/usr/bin/env bash
# Run every benchmark in order and leave the JSON in .bench/ (see BENCHMARKS.md).
#
#   bash ops/bench/run_all.sh            # a private broker in .bench/kafka-run, removed at the end
#   KAFKA_BOOTSTRAP=HOST:PORT bash ops/bench/run_all.sh   # an existing broker
#
# A private broker (KAFKA_RUN_DIR) keeps other people's tests, which stop and restart the project broker,
# from disturbing a run. Latency uses the maximum that throughput.py measured just before it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python

if [[ -z "${KAFKA_BOOTSTRAP:-}" ]]; then
    export KAFKA_RUN_DIR="$PWD/.bench/kafka-run"
    eval "$(bash ops/kafka/kafka.sh start --port auto)"
    trap 'bash ops/kafka/kafka.sh clean >/dev/null 2>&1 || true' EXIT
fi
echo "Kafka at ${KAFKA_BOOTSTRAP}"

"$PY" ops/bench/throughput.py --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" ops/bench/latency.py --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" ops/bench/memory.py --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" ops/bench/scaleout.py --bootstrap "$KAFKA_BOOTSTRAP" --pinned
"$PY" ops/bench/glue.py
"$PY" ops/bench/llm_saturation.py --duration 120
