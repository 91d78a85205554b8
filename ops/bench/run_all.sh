#!/usr/bin/env bash
# Run every benchmark in order and leave the JSON in .bench/ (see BENCHMARKS.md).
#
#   bash ops/bench/run_all.sh            # a private broker in .bench/kafka-run, removed at the end
#   KAFKA_BOOTSTRAP=HOST:PORT bash ops/bench/run_all.sh   # an existing broker
#
# A private broker (KAFKA_RUN_DIR) keeps other people's tests, which stop and restart the project broker,
# from disturbing a run. Latency uses the maximum that the throughput benchmark measured just before it.
# Each benchmark is a module of the ops.bench package, run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python

if [[ -z "${KAFKA_BOOTSTRAP:-}" ]]; then
    export KAFKA_RUN_DIR="$PWD/.bench/kafka-run"
    eval "$(bash ops/kafka/kafka.sh start --port auto)"
    trap 'bash ops/kafka/kafka.sh clean >/dev/null 2>&1 || true' EXIT
fi
echo "Kafka at ${KAFKA_BOOTSTRAP}"

"$PY" -m ops.bench.compare --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" -m ops.bench.throughput --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" -m ops.bench.latency --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" -m ops.bench.memory --bootstrap "$KAFKA_BOOTSTRAP"
"$PY" -m ops.bench.scaleout --bootstrap "$KAFKA_BOOTSTRAP" --pinned
"$PY" -m ops.bench.glue
"$PY" -m ops.bench.llm_saturation --duration 120 --out .bench/llm_saturation_rpm.json
"$PY" -m ops.bench.llm_saturation --duration 120 --rpm 100000 --tpm 100000 --repeat-text 4 --out .bench/llm_saturation_tpm.json
