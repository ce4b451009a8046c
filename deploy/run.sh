#!/usr/bin/env bash
# Operator: run the app on the federation and exit 0 only if the run completed. `flwr run --stream`
# exits 0 even when the run failed, so the status comes from `flwr ls`.
#   deploy/run.sh CONNECTION "RUN_CONFIG"      e.g. deploy/run.sh fedunlearn "num-clients=4 out-dir='/srv/fl/runs/r1'"
# num-clients must equal the number of SuperNodes; out-dir is a path on the SuperLink host.
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 1 ] || { echo "usage: $0 CONNECTION [RUN_CONFIG]" >&2; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
flwr run "$PROJECT_ROOT" "$1" ${2:+--run-config "$2"} --stream 2>&1 | tee "$log"
run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$log" | head -n 1)
[ -n "$run_id" ] || { echo "flwr run did not start a run" >&2; exit 1; }
status=$(flwr ls "$1" --run-id "$run_id" --format json | python -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $run_id: $status"
[ "$status" = "finished:completed" ]
