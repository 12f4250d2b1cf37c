#!/usr/bin/env bash
# Generates a throw-away test CA and a server certificate (ECDSA P-256) signed by it.
# usage: gen-test-certs.sh DIR [NAME]   (NAME defaults to mail.example.test)
# Writes DIR/ca.pem, DIR/NAME.pem (chain: leaf then CA) and DIR/NAME.key.
set -euo pipefail
dir=${1:?usage: gen-test-certs.sh DIR [NAME]}
name=${2:-mail.example.test}
mkdir -p "$dir"
cd "$dir"
# Valid a year; a CA left from an earlier run is replaced when it has under 60 days left
# (mailmoat check warns about certificates that expire within 30 days).
if [ ! -f ca.pem ] || ! openssl x509 -in ca.pem -noout -checkend $((60 * 86400)) >/dev/null; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.pem -days 365 -subj "/CN=mailmoat test CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$name.key" -out "$name.csr" -subj "/CN=$name" 2>/dev/null
openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
    -extfile <(printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\n' "$name") \
    -out "$name.leaf.pem" 2>/dev/null
cat "$name.leaf.pem" ca.pem > "$name.pem"
rm -f "$name.csr" "$name.leaf.pem"
echo "$dir/$name.pem"
