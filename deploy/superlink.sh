#!/usr/bin/env bash
# SuperLink host: TLS on, only registered SuperNodes admitted, the ServerApp run in this project's
# environment (no `uv sync`, which would install a CUDA torch). Fleet, Control and Runtime APIs
# share PORT: open it to the SuperNodes' and the operator's addresses only.
#   deploy/superlink.sh CERT_DIR [HOST] [PORT]   (defaults 0.0.0.0 and Flower's 8000; state kept in CERT_DIR/superlink-state.db)
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 1 ] || { echo "usage: $0 CERT_DIR [HOST] [PORT]" >&2; exit 2; }
dir=$(cd "$1" && pwd); host=${2:-0.0.0.0}; port=${3:-8000}
# Run from the project root: a relative out-dir in the run config resolves against it.
cd "$PROJECT_ROOT"
exec flower-superlink \
    --ssl-ca-certfile "$dir/ca.crt" --ssl-certfile "$dir/server.pem" --ssl-keyfile "$dir/server.key" \
    --enable-supernode-auth --isolation subprocess --disable-runtime-dependency-installation \
    --database "$dir/superlink-state.db" --host "$host" --port "$port"
