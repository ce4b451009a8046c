#!/usr/bin/env bash
# Operator: admit one SuperNode by its public key (repeat per data holder). Prints its node id.
#   deploy/register-supernode.sh PUBLIC_KEY [CONNECTION]
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 1 ] || { echo "usage: $0 PUBLIC_KEY [CONNECTION]" >&2; exit 2; }
flwr supernode register "$1" ${2:+"$2"}
