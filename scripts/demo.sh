#!/usr/bin/env bash
# The demo: a real legacy Postfix + Dovecot on loopback without TLS, and mailmoat in
# front of it. Installs what it needs (Debian, as root), builds mailmoat, starts
# everything, runs real sessions through each listener, then leaves it running.
#
#   scripts/demo.sh         set up, start, show
#   scripts/demo.sh stop    stop mailmoat and the legacy servers
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
demo=${MAILMOAT_DEMO_DIR:-/tmp/mailmoat-demo}

stop() {
    if [ -f "$demo/mailmoat.pid" ]; then
        kill "$(cat "$demo/mailmoat.pid")" 2>/dev/null || true
        rm -f "$demo/mailmoat.pid"
    fi
    [ -d "$demo/legacy" ] && bash scripts/legacy.sh stop "$demo/legacy" || true
}

if [ "${1:-}" = stop ]; then
    stop
    echo "demo stopped"
    exit 0
fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "installing the legacy servers and clients (Debian packages)"
if [ "$(id -u)" = 0 ]; then bash scripts/install-deps.sh; fi

step "building mailmoat"
cargo build --release --quiet

stop
mkdir -p "$demo"
step "starting a legacy Postfix (SMTP 127.0.0.1:2525) and Dovecot, without TLS"
bash scripts/legacy.sh start "$demo/legacy"
# shellcheck disable=SC1091
. "$demo/legacy/legacy.env"

step "generating a test CA and a certificate for mail.example.test"
bash scripts/gen-test-certs.sh "$demo/certs" mail.example.test >/dev/null

cat > "$demo/mailmoat.yaml" <<YAML
tls:
  certificates:
    - { cert: $demo/certs/mail.example.test.pem, key: $demo/certs/mail.example.test.key }
listeners:
  - { name: mx,         protocol: smtp, listen: "127.0.0.1:10025", tls: starttls, policy: auth_requires_tls, upstream: "127.0.0.1:$LEGACY_SMTP_PORT" }
  - { name: submission, protocol: smtp, listen: "127.0.0.1:10587", tls: starttls, upstream: "127.0.0.1:$LEGACY_SMTP_PORT" }
  - { name: smtps,      protocol: smtp, listen: "127.0.0.1:10465", tls: implicit, upstream: "127.0.0.1:$LEGACY_SMTP_PORT" }
  - { name: imap,       protocol: imap, listen: "127.0.0.1:10143", tls: starttls, upstream: "127.0.0.1:$LEGACY_IMAP_PORT" }
  - { name: imaps,      protocol: imap, listen: "127.0.0.1:10993", tls: implicit, upstream: "127.0.0.1:$LEGACY_IMAP_PORT" }
  - { name: pop3,       protocol: pop3, listen: "127.0.0.1:10110", tls: starttls, upstream: "127.0.0.1:$LEGACY_POP3_PORT" }
  - { name: pop3s,      protocol: pop3, listen: "127.0.0.1:10995", tls: implicit, upstream: "127.0.0.1:$LEGACY_POP3_PORT" }
metrics: { listen: "127.0.0.1:10925" }
YAML
step "mailmoat check: config, certificate, each upstream, and the open-relay trap"
"$root/target/release/mailmoat" check -c "$demo/mailmoat.yaml"

step "mailmoat explain (submission): what Postfix says, and what clients see before and after TLS"
"$root/target/release/mailmoat" explain -c "$demo/mailmoat.yaml" |
    awk '/^listener submission/{on=1} /^listener smtps/{on=0} on'

step "starting mailmoat (config $demo/mailmoat.yaml, log $demo/mailmoat.log)"
"$root/target/release/mailmoat" run -c "$demo/mailmoat.yaml" >"$demo/mailmoat.log" 2>&1 &
echo $! >"$demo/mailmoat.pid"
for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/10587) 2>/dev/null && break
    sleep 0.1
done

step "what the legacy Postfix itself offers (no STARTTLS, AUTH in the clear)"
swaks --server 127.0.0.1:"$LEGACY_SMTP_PORT" --quit-after EHLO 2>&1 | grep -E '^ *<-'

step "the same server through mailmoat's submission port: STARTTLS injected, AUTH hidden"
swaks --server 127.0.0.1:10587 --quit-after EHLO 2>&1 | grep -E '^ *<-'

step "a plaintext login attempt is refused by mailmoat and never reaches Postfix"
exec 3<>/dev/tcp/127.0.0.1/10587
read -r -t 5 greeting <&3; echo "<- $greeting"
printf 'EHLO demo.example\r\n' >&3
while read -r -t 5 line <&3; do echo "<- $line"; [[ $line == "250 "* ]] && break; done
printf 'AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=\r\n' >&3
echo "-> AUTH PLAIN AGFsaWNl...(alice's password)"
read -r -t 5 line <&3; echo "<- $line"
printf 'QUIT\r\n' >&3; exec 3>&-

step "STARTTLS, then AUTH and a message, through submission (swaks)"
swaks --server 127.0.0.1:10587 --tls --auth PLAIN --auth-user alice@example.test \
    --auth-password alice-secret-pw --from bob@example.test --to alice@example.test \
    --header "Subject: hello through the moat" 2>&1 | grep -E '^ *(<-|->|<~|~>|===)' | sed -n '1,40p'

step "implicit TLS (smtps) and the public MX (plaintext mail allowed, no AUTH)"
swaks --server 127.0.0.1:10465 --tls-on-connect --auth PLAIN --auth-user alice@example.test \
    --auth-password alice-secret-pw --from bob@example.test --to alice@example.test \
    --header "Subject: hello over smtps" 2>&1 | grep -E '^ *(<~|~>)' | tail -4
swaks --server 127.0.0.1:10025 --from someone@remote.example --to alice@example.test \
    --header "Subject: hello over the mx" 2>&1 | grep -E '^ *(<-|->)' | tail -4

# Sends each argument as a line to 127.0.0.1:PORT and prints the dialogue.
talk() {
    local port=$1 line
    shift
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    read -r -t 5 line <&3 && echo "<- ${line%$'\r'}"
    for command in "$@"; do
        printf '%s\r\n' "$command" >&3
        echo "-> $command"
        while read -r -t 1 line <&3; do echo "<- ${line%$'\r'}"; done
    done
    exec 3>&-
}

step "IMAP: the legacy Dovecot's own greeting, then the same through mailmoat"
talk "$LEGACY_IMAP_PORT" "a LOGOUT"
talk 10143 "a CAPABILITY" "b LOGIN alice@example.test alice-secret-pw" "c LOGOUT"

step "IMAP: STARTTLS, login and a listing through mailmoat (curl --ssl-reqd)"
curl -sS --ssl-reqd --cacert "$demo/certs/ca.pem" --resolve mail.example.test:10143:127.0.0.1 \
    -u alice@example.test:alice-secret-pw 'imap://mail.example.test:10143/INBOX?ALL' -X 'EXAMINE INBOX' | sed -n '1,5p'

step "POP3: CAPA and a plaintext USER through mailmoat, then STLS and a listing (curl)"
talk 10110 "CAPA" "USER alice@example.test" "QUIT"
curl -sS --ssl-reqd --cacert "$demo/certs/ca.pem" --resolve mail.example.test:10110:127.0.0.1 \
    -u alice@example.test:alice-secret-pw pop3://mail.example.test:10110/ | sed -n '1,3p'

step "delivered to alice's Maildir by the legacy Postfix"
ls -1t "$LEGACY_MAILDIR_ALICE/new" "$LEGACY_MAILDIR_ALICE/cur" | grep -v -e "^$" -e ":$" | head -3

step "mailmoat's security events"
grep -E 'event="(credentials_exposed|plaintext_command_refused|tls_established|session_end)"' \
    "$demo/mailmoat.log" | tail -6

step "the same events as Prometheus counters (http://127.0.0.1:10925/metrics)"
curl -sS http://127.0.0.1:10925/metrics |
    grep -E '^mailmoat_(security_events_total\{listener="(submission|pop3)",event="(credentials_exposed|plaintext_command_refused|tls_established)"|sessions_total\{listener="submission")' || true

cat <<EOF

mailmoat is running (pid $(cat "$demo/mailmoat.pid")) in front of the legacy Postfix:
  MX          127.0.0.1:10025  STARTTLS, plaintext mail allowed, AUTH only after TLS
  submission  127.0.0.1:10587  STARTTLS required before anything else
  smtps       127.0.0.1:10465  implicit TLS
  imap / imaps  127.0.0.1:10143 (STARTTLS) / 10993 (implicit TLS), login only after TLS
  pop3 / pop3s  127.0.0.1:10110 (STLS) / 10995 (implicit TLS), USER/PASS only after TLS
Point a client at it: server 127.0.0.1, port 10587, STARTTLS, user alice@example.test,
password alice-secret-pw; trust the test CA $demo/certs/ca.pem (name mail.example.test).
  swaks --server 127.0.0.1:10587 --tls --auth-user alice@example.test --auth-password alice-secret-pw --to alice@example.test
Metrics: http://127.0.0.1:10925/metrics    Reload: kill -HUP $(cat "$demo/mailmoat.pid")
Log: $demo/mailmoat.log    Stop: scripts/demo.sh stop
EOF
