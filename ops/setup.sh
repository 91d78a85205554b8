#!/usr/bin/env bash
# Creates (once) the project's virtualenv in .venv and installs the project with the given extras.
# Usage: source ops/setup.sh [EXTRAS]   e.g. `source ops/setup.sh test`
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-test}"
_venv="${SHUNT_VENV:-$_root/.venv}"
_stamp="$_venv/.installed-$_extras"
if [ ! -x "$_venv/bin/python" ]; then
  echo "setup: creating virtualenv $_venv" >&2
  python3 -m venv "$_venv"
  "$_venv/bin/python" -m pip install --quiet --upgrade pip
fi
if [ ! -f "$_stamp" ] || [ "$_root/pyproject.toml" -nt "$_stamp" ]; then
  echo "setup: installing data-shunt[$_extras]" >&2
  "$_venv/bin/python" -m pip install --quiet -e "$_root[$_extras]"
  touch "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
