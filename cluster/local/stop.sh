#!/usr/bin/env bash
# Stop the local Ray cluster started by start.sh (only its own processes; other Rays on the
# machine are left alone) and delete its token. Option: --dir DIR (same default as start.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.local_cluster stop "$@"
