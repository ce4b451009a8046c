#!/usr/bin/env bash
# Operator: a self-signed CA and the SuperLink's TLS certificate (the commands of
# simulations/credentials.py:make_certificates). Give every name or IP that SuperNodes and the
# flwr CLI dial; 127.0.0.1 and localhost are always added (the SuperLink's own SuperExec dials them).
#   deploy/make-certs.sh DIR HOST [HOST...]     e.g. deploy/make-certs.sh ~/fl-certs superlink.example.org 10.0.0.5
# Give DIR/ca.crt to every SuperNode and flwr user; DIR/ca.key and DIR/server.key stay on their hosts.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR HOST [HOST...]" >&2; exit 2; }
dir=$1; shift
mkdir -p "$dir"
names=""
for host in "$@" 127.0.0.1 localhost; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then entry="IP:$host"; else entry="DNS:$host"; fi
    [[ ",$names," == *",$entry,"* ]] || names="${names:+$names,}$entry"
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days 365 \
    -subj "/CN=fedunlearn SuperLink CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -subj "/CN=$1" -keyout "$dir/server.key" -out "$dir/server.csr"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$names" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 365 -sha384 -extfile "$dir/server.ext" -out "$dir/server.pem"
chmod 600 "$dir/ca.key" "$dir/server.key"
echo "CA: $dir/ca.crt; SuperLink certificate for $names: $dir/server.pem, key $dir/server.key"
