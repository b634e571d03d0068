#!/usr/bin/env bash
# Start a local Ray cluster on this machine: a head and worker nodes, each its own `ray start`,
# with token authentication and a dashboard on 127.0.0.1 only. Prints the address, the dashboard
# and how to submit jobs. Options: --dir DIR --workers N --cpus-per-node C --head-cpus C
# --object-store-mb M --failure-detection-s S
# (defaults: $RECLORA_CLUSTER_DIR or /tmp/reclora-cluster-$USER, 1 worker, 1 CPU per node).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.local_cluster start "$@"
