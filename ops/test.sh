#!/usr/bin/env bash
# The test command: sets itself up, starts Apache Kafka unless KAFKA_BOOTSTRAP points at one, then runs
# lint (ruff), format check, types (mypy --strict), import rules (lint-imports) and the whole pytest suite against the real broker.
# Extra arguments go to pytest, e.g. `bash ops/test.sh -k offsets`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=ops/setup.sh
source ops/setup.sh test

started_kafka=""
cleanup() {
  if [ -n "$started_kafka" ]; then bash ops/kafka/kafka.sh stop >&2 || true; fi
}
trap cleanup EXIT
if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  out="$(bash ops/kafka/kafka.sh start --port auto)"
  echo "$out" >&2
  KAFKA_BOOTSTRAP="$(echo "$out" | sed -n 's/^KAFKA_BOOTSTRAP=//p' | tail -n 1)"
  [ -n "$KAFKA_BOOTSTRAP" ] || { echo "test: Kafka did not report its address" >&2; exit 1; }
  started_kafka=1
fi
export KAFKA_BOOTSTRAP

echo "== ruff check" && ruff check consumer tests ops
echo "== ruff format --check" && ruff format --check consumer tests ops
echo "== mypy --strict consumer" && mypy consumer
echo "== lint-imports (the layers in pyproject.toml)" && lint-imports
echo "== pytest (Kafka at $KAFKA_BOOTSTRAP)"
set +e
python -m pytest -v --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
fi
exit "$status"
