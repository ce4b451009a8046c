#!/usr/bin/env bash
# Operator: the flwr CLI's connection NAME to the SuperLink at ADDRESS (host:port), over TLS
# trusting CA (no `insecure`), added to $FLWR_HOME/config.toml (in the project cache).
#   deploy/connect.sh NAME ADDRESS CA      e.g. deploy/connect.sh fedunlearn superlink.example.org:8000 ~/fl-certs/ca.crt
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -eq 3 ] || { echo "usage: $0 NAME ADDRESS CA" >&2; exit 2; }
ca=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
config=$FLWR_HOME/config.toml
mkdir -p "$FLWR_HOME"
if [ -f "$config" ] && grep -q "^\[superlink\.$1\]" "$config"; then
    echo "connection '$1' is already in $config; edit it there" >&2; exit 1
fi
[ -f "$config" ] || printf '[superlink]\ndefault = "%s"\n' "$1" > "$config"
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$1" "$2" "$ca" >> "$config"
echo "connection '$1' -> $2 (TLS, trusting $ca) in $config"
