#!/usr/bin/env bash
# The main job: the whole pipeline on one machine — an embedded Kafka-protocol broker (no Java, no Docker),
# a stream of synthetic reviews, the small model, the shunt, the stand-in LLM — ending in a summary of
# accuracy, spend and savings. Sets itself up on first use (.venv). Arguments go to `shunt demo`, e.g.
# `bash ops/demo.sh --small` or `bash ops/demo.sh --reviews 5000 --rate 0`. See docs/demo.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=ops/setup.sh
source ops/setup.sh test
# exec: Ctrl-C goes straight to the demo (which stops its broker), and its exit status is ours.
exec shunt demo "$@"
