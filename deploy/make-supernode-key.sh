#!/usr/bin/env bash
# Data holder: this SuperNode's key pair (ECDSA P-384, OpenSSH format). The private key never
# leaves this machine; send NAME.pub to the operator, who registers it (register-supernode.sh).
#   deploy/make-supernode-key.sh DIR NAME      e.g. deploy/make-supernode-key.sh ~/fl-keys hospital-a
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DIR NAME" >&2; exit 2; }
mkdir -p "$1"
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$2" -f "$1/$2"
echo "private key: $1/$2 (keep it here); public key to register: $1/$2.pub"
