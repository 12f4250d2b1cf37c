#!/usr/bin/env bash
# What the outbound relay's "one recipient domain per transaction" rule costs a real
# Postfix sender: one message to two domains through mailmoat (452 4.5.3 for the
# second), timed until both copies are at the MX. Loopback only (scripts/outbound-lab.sh),
# bounded to 15 minutes.
#
#   scripts/outbound-452-cost.sh [POSTFIX_SETTING...]
#
# Each argument is a "name = value" line for the sender's main.cf, e.g.
#   scripts/outbound-452-cost.sh                                        # Postfix defaults
#   scripts/outbound-452-cost.sh "smtp_destination_recipient_limit = 1"
# Prints the seconds from submission to each recipient's delivery, from the sender's log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
NET=${OUTBOUND_LAB_NET:-212}
PORT=${RELAY_PORT:-10212}
DIR=$(mktemp -d /tmp/mm452.XXXXXX)
MM_PID=
cleanup() {
    if [ -n "$MM_PID" ]; then kill "$MM_PID" 2>/dev/null || true; fi
    bash scripts/outbound-lab.sh stop "$DIR" >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT
extra=$(printf '%s\n' "$@")
cargo build --release -p mailmoat >&2
OUTBOUND_LAB_NET=$NET OUTBOUND_LAB_RELAY_PORT=$PORT OUTBOUND_LAB_SENDER_EXTRA="$extra" \
    bash scripts/outbound-lab.sh start "$DIR" >&2
# shellcheck disable=SC1091
. "$DIR/lab.env"
cat >"$DIR/mailmoat.yaml" <<YAML
tls: { certificates: [ { cert: $LAB_CERTS/mx1.pem, key: $LAB_CERTS/mx1.key } ] }
listeners:
  - { name: unused, protocol: smtp, listen: "127.0.0.1:0", upstream: "127.0.0.1:9" }
outbound:
  listen: "127.0.0.1:$PORT"
  hostname: relay.example.test
  resolver: "$LAB_RESOLVER"
  extra_ca_file: $LAB_CA
YAML
"${CARGO_TARGET_DIR:-target}/release/mailmoat" run -c "$DIR/mailmoat.yaml" 2>"$DIR/mailmoat.log" &
MM_PID=$!
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
start=$(date +%s)
printf 'From: a@legacy.example\nTo: first@dane.test, second@plain.test\nSubject: cost\n\nbody\n' |
    sendmail -C "$LAB_SENDER_POSTFIX" -f a@legacy.example first@dane.test second@plain.test
for _ in $(seq 900); do
    [ "$(grep -c 'status=sent' "$LAB_SENDER_LOG" || true)" -ge 2 ] && break
    sleep 1
done
echo "settings: ${*:-Postfix defaults}"
for rcpt in first@dane.test second@plain.test; do
    line=$(grep "to=<$rcpt>.*status=sent" "$LAB_SENDER_LOG" | tail -1 || true)
    if [ -z "$line" ]; then
        echo "$rcpt: not delivered within $(($(date +%s) - start)) s"
    else
        echo "$rcpt: delivered, $(grep -o 'delay=[0-9.]*' <<<"$line")"
    fi
done
grep -c '452 4.5.3' "$LAB_SENDER_LOG" | sed 's/^/452 4.5.3 replies: /'
