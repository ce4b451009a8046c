#!/usr/bin/env bash
# Data holder: one SuperNode, over TLS, signing with its registered key. Its ClientApp reads data
# from DATA_DIR (node config; overrides the run config's data-dir) and computes where device=auto
# finds a GPU. RUNTIME_PORT is its local Runtime API (loopback only; one per SuperNode on a host).
#   deploy/supernode.sh SUPERLINK_ADDRESS CA PRIVATE_KEY PARTITION_ID NUM_PARTITIONS DATA_DIR [RUNTIME_PORT]
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 6 ] || { echo "usage: $0 SUPERLINK_ADDRESS CA PRIVATE_KEY PARTITION_ID NUM_PARTITIONS DATA_DIR [RUNTIME_PORT]" >&2; exit 2; }
data_dir=$(mkdir -p "$6" && cd "$6" && pwd)
exec flower-supernode --superlink "$1" --root-certificates "$2" --auth-supernode-private-key "$3" \
    --node-config "partition-id=$4 num-partitions=$5 data-dir=\"$data_dir\"" \
    --isolation subprocess --host 127.0.0.1 --port "${7:-9094}"
