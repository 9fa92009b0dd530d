#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh demo [--out DIR]   the main job (--resume continues a run in DIR)
#   bash run.sh test [PYTEST ARGS] the test suite (what CI runs: bash run.sh test -q)
#   bash run.sh test --quick       a subset touching every part, a few minutes
#                                  (tests/conftest.py QUICK; any pytest args work too)
# Each creates (or reuses) ./.venv with Python >= 3.11 and installs what it needs.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11 python; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "jaxembed needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  return 1
}

ensure_env() {  # $1: extras to install, e.g. "tf" or "tf,test"
  if [ ! -x .venv/bin/python ]; then
    "$(find_python)" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
  fi
  local stamp=".venv/.installed-${1//,/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] ||
    [ csrc/cpu_kernels.cc -nt "$stamp" ] || [ csrc/fingerprint.cc -nt "$stamp" ] || [ csrc/distinct.cc -nt "$stamp" ] || [ jaxembed/_kernel_abi.py -nt "$stamp" ]; then
    echo "installing jaxembed[$1] into .venv ..." >&2
    .venv/bin/python -m pip install --quiet -e ".[$1]"
    touch "$stamp"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  demo) ensure_env demo; exec .venv/bin/jaxembed demo "$@" ;;
  test) ensure_env tf,test; exec .venv/bin/python -m pytest -n 2 "$@" ;;
  *) echo "usage: bash run.sh demo [--out DIR] [--resume] | bash run.sh test [--quick] [PYTEST ARGS]" >&2; exit 2 ;;
esac
