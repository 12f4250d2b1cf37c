#!/usr/bin/env bash
# Benchmarks mailmoat against its own plaintext upstream, in the same run, on loopback.
#
#   scripts/bench.sh [--quick] [--reps N] [--keep] [--glibc-default] [--only PREFIX]
#                    [--baseline PATH] [--haproxy]
#
# Starts Postfix's smtp-sink (a fast SMTP upstream) and a private Dovecot (scripts/
# legacy.sh) holding a prepared 10 MB message, then two mailmoat instances (ECDSA P-256
# and RSA-2048 certificates) pinned to core 0 while the load generator (the workspace
# member bench/, target/release/mailmoat-bench) and the upstreams run on core 1. Each
# scenario runs direct (plaintext to the upstream) and through mailmoat alternately,
# --reps times (default 5, --quick: 2 with smaller counts); the medians are printed as a
# Markdown table. Every reply is verified; a run with errors is shown as such. Raw
# results: WORKDIR/results.jsonl. Root is needed to install packages and for smtp-sink -u.
# mailmoat runs with the environment config/mailmoat.service gives it (its glibc copy
# tuning); bulk DATA is also measured without it, and --glibc-default drops it everywhere.
# --only PREFIX runs only the scenarios whose names start with PREFIX (e.g. --only flood).
# --baseline PATH: another release build of mailmoat (e.g. of the commit before a change),
# run beside this tree's in the full-session scenarios (smtp_starttls_*, smtp_implicit_*)
# and idle_N, with the same config, certificates, environment and core: each repetition
# runs the two binaries one after the other, never at once, the order flipping every
# repetition. The table gets a "baseline binary" row (ratio = this tree / baseline) under
# their CPU, sessions/s, latency and memory rows; the per-repetition values follow it.
# PATH is copied before the build, so a build into its target dir cannot swap it mid-run.
# --haproxy: HAProxy (Debian's package, installed if missing) is measured beside mailmoat
# in the same run, in the implicit-TLS scenarios: smtp_implicit_ecdsa (full sessions),
# smtp_implicit_ecdsa_sequential (the same one at a time: the latency each proxy adds),
# smtp_bulk_data_implicit, imap_fetch_10mb_implicit (imaps) and idle_N_implicit. It runs
# `mode tcp` with `ssl crt` on its bind lines, the same certificate chain and key as
# mailmoat's ECDSA instance, in front of the same smtp-sink and Dovecot, pinned to the
# same core 0, one foreground process (-db, no master-worker) with nbthread 1 and no log,
# TLS 1.3 only with TLS_AES_128_GCM_SHA256 and X25519, which mailmoat negotiates with the
# generator too (the generator offers X25519 alone; its suites are printed per side).
# mailmoat's tokio runtime sizes itself to its affinity mask: pinned to one core it runs
# one worker thread (beside its main thread), HAProxy one thread; each side's CPU is the
# run time of all its threads, one side loaded at a time, on the same core. The
# comparison is made without the unit's glibc tuning: these scenarios also run an
# instance with glibc's defaults ("glibc_default", mailmoat started plainly, as HAProxy
# is), and the table's "haproxy" rows compare it (ratio = mailmoat / HAProxy), with the
# tuned instance as an extra row; a summary in issue 14's layout and each repetition's
# ratio of the CPU and memory rows follow the table. --only haproxy runs just these five scenarios (and
# implies --haproxy). Without --haproxy they run with mailmoat alone. Every side of a
# scenario runs in each repetition, one at a time, the order reversed every repetition.
# Bounded: every generator run has a --timeout, the whole script a watchdog (25 min).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
REPS=
KEEP=0
GLIBC_DEFAULT=0
ONLY=
BASELINE=
HAPROXY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --reps) REPS=${2:?--reps N}; shift ;;
        --keep) KEEP=1 ;;
        --glibc-default) GLIBC_DEFAULT=1 ;;
        --only) ONLY=${2:?--only PREFIX}; shift ;;
        --baseline) BASELINE=${2:?--baseline PATH}; shift ;;
        --haproxy) HAPROXY=1 ;;
        # The header comment above, whatever its length.
        -h | --help) awk 'NR > 1 { if (!/^#/) exit; print }' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    REPS=${REPS:-2}
    N_SEQUENTIAL=200
    N_HANDSHAKE=400; N_RESUME=400; BULK_SIZE=2000000; BULK_MSGS=3; IMAP_FETCHES=3
    LAT_TX=500; N_IDLE=1000; N_CONC=300; IDLE_REPS=1; N_FLOOD=100; FLOOD_REPS=1
else
    REPS=${REPS:-5}
    N_SEQUENTIAL=500
    N_HANDSHAKE=2000; N_RESUME=2000; BULK_SIZE=10000000; BULK_MSGS=4; IMAP_FETCHES=4
    LAT_TX=2000; N_IDLE=5000; N_CONC=1000; IDLE_REPS=3; N_FLOOD=100; FLOOD_REPS=3
fi
# The implicit-TLS scenarios HAProxy is measured in (--haproxy; --only haproxy).
HAPROXY_SCENARIOS=(smtp_implicit_ecdsa smtp_implicit_ecdsa_sequential smtp_bulk_data_implicit
    imap_fetch_10mb_implicit "idle_${N_IDLE}_implicit")
[ "$ONLY" = haproxy ] && HAPROXY=1
# Whether scenario NAME runs (--only).
want() {
    [ -z "$ONLY" ] || [[ "$1" == "$ONLY"* ]] ||
        { [ "$ONLY" = haproxy ] && [[ " ${HAPROXY_SCENARIOS[*]} " == *" $1 "* ]]; }
}

log() { echo "bench.sh: $*" >&2; }
die() { log "$*"; exit 1; }
if [ -n "$BASELINE" ]; then
    if ! [ -f "$BASELINE" ] || ! [ -x "$BASELINE" ]; then
        die "--baseline $BASELINE: no executable file there"
    fi
    BASELINE=$(realpath "$BASELINE")
fi

# ------------------------------------------------------------------ dependencies
need_install=0
for b in smtp-sink postfix dovecot taskset python3 openssl; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages; run as root so scripts/install-deps.sh can install them"
    log "installing the legacy mail stack (scripts/install-deps.sh)"
    "$ROOT/scripts/install-deps.sh"
    command -v taskset >/dev/null 2>&1 || apt-get install -y --no-install-recommends util-linux
fi
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
# --haproxy: Debian's package (2.6 on Debian 12). Where systemd runs, the package starts
# its own haproxy.service (Debian's haproxy.cfg has no listener); this script runs
# another instance of the binary with its own config, and stops only that one.
HAPROXY_BIN=
if [ "$HAPROXY" = 1 ]; then
    if ! command -v haproxy >/dev/null 2>&1 && ! [ -x /usr/sbin/haproxy ]; then
        [ "$(id -u)" = 0 ] || die "--haproxy: haproxy is not installed; run as root to install it"
        log "installing haproxy (Debian's package)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >&2 || {
            apt-get update -q >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >&2
        }
    fi
    HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)
fi
if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
        log "installing a Rust toolchain with rustup (minimal profile)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    }
    export PATH=$HOME/.cargo/bin:$PATH
fi

# --baseline: the binary is copied before the build, which could otherwise replace it
# under the run (a baseline taken from the target dir being built).
BASE_MM=
KEEP_BASE_MM=0
if [ -n "$BASELINE" ]; then
    BASE_MM=$(mktemp /tmp/mmbench-baseline.XXXXXX)
    trap '[ "$KEEP_BASE_MM" = 1 ] || rm -f "$BASE_MM"' EXIT
    install -m 755 "$BASELINE" "$BASE_MM"
fi

log "building release binaries"
(cd "$ROOT" && cargo build --release -p mailmoat -p mailmoat-bench >&2)
MM=${CARGO_TARGET_DIR:-$ROOT/target}/release/mailmoat
GEN=${CARGO_TARGET_DIR:-$ROOT/target}/release/mailmoat-bench
BASE_INFO=
if [ -n "$BASELINE" ]; then
    if ! cmp -s "$BASELINE" "$BASE_MM"; then
        KEEP_BASE_MM=1
        log "WARNING: the build replaced $BASELINE; this run uses the copy taken before" \
            "the build, kept at $BASE_MM (build baselines into their own CARGO_TARGET_DIR)"
    fi
    cmp -s "$MM" "$BASE_MM" &&
        log "note: the baseline is the very binary this tree builds: it is compared with itself"
    BASE_INFO="$BASELINE (sha256 $(sha256sum <"$BASE_MM" | cut -c1-12)) vs this tree's"
    BASE_INFO+=" $MM (sha256 $(sha256sum <"$MM" | cut -c1-12))"
fi

# ------------------------------------------------------------------ cores, limits
CORES=$(nproc)
if [ "$CORES" -ge 2 ]; then
    PROXY_CPU=0; LOAD_CPU=1
else
    PROXY_CPU=0; LOAD_CPU=0
    log "only one core: mailmoat and the load share it (numbers are not per-core)"
fi
# 5,000 idle sessions: 5,000 descriptors here, 10,000 in mailmoat, 5,000 in smtp-sink.
# HAProxy asks for 2 per connection of its maxconn (N_IDLE + 1000) and refuses to start
# when the limit is lower.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
HAPROXY_MAXCONN=$((N_IDLE + 1000))
NEED_FDS=$((N_IDLE * 2 + 1000))
[ "$HAPROXY" = 1 ] && NEED_FDS=$((HAPROXY_MAXCONN * 2 + 100))
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$NEED_FDS" ] ||
    die "ulimit -n is $(ulimit -n); need $NEED_FDS for $N_IDLE idle sessions"

# ------------------------------------------------------------------ workdir, processes
WORK=$(mktemp -d /tmp/mmbench.XXXXXX)
PIDS=()
LEGACY_DIR=$WORK/legacy
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    [ -n "$BASE_MM" ] && [ "$KEEP_BASE_MM" = 0 ] && rm -f "$BASE_MM"
    [ -d "$LEGACY_DIR" ] && bash "$ROOT/scripts/legacy.sh" stop "$LEGACY_DIR" >/dev/null 2>&1 || true
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
# Watchdog: the whole run is bounded. Killed at the end, it takes its sleep with it.
(
    trap 'kill "$s" 2>/dev/null; exit 0' TERM
    sleep 1500 & s=$!
    wait "$s"
    log "watchdog: 25 minutes exceeded, stopping"
    kill -TERM $$
) 2>/dev/null &
WATCHDOG=$!
PIDS+=("$WATCHDOG")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
    local port=$1 i
    for i in $(seq 1 200); do
        timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$port" 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on 127.0.0.1:$port"
}

# ------------------------------------------------------------------ certificates
CERTS=$WORK/certs
bash "$ROOT/scripts/gen-test-certs.sh" "$CERTS" >/dev/null
# RSA-2048 leaf signed by the same CA.
openssl req -newkey rsa:2048 -nodes -keyout "$CERTS/rsa.key" -out "$CERTS/rsa.csr" \
    -subj "/CN=mail.example.test" 2>/dev/null
openssl x509 -req -in "$CERTS/rsa.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days 30 -out "$CERTS/rsa.leaf.pem" \
    -extfile <(printf 'subjectAltName=DNS:mail.example.test\nextendedKeyUsage=serverAuth\n') 2>/dev/null
cat "$CERTS/rsa.leaf.pem" "$CERTS/ca.pem" >"$CERTS/rsa.pem"
# HAProxy's crt: the very chain mailmoat's ECDSA instance serves (leaf, then CA), and its
# key, in one file.
cat "$CERTS/mail.example.test.pem" "$CERTS/mail.example.test.key" >"$CERTS/haproxy-ecdsa.pem"

# ------------------------------------------------------------------ upstreams (core 1)
SINK_PORT=$(free_port)
SINK_USER=()
[ "$(id -u)" = 0 ] && SINK_USER=(-u nobody)
taskset -c "$LOAD_CPU" "$SMTP_SINK" "${SINK_USER[@]}" -m $((N_IDLE + 2000)) \
    "127.0.0.1:$SINK_PORT" 4096 >"$WORK/smtp-sink.log" 2>&1 &
SINK_PID=$!
PIDS+=("$SINK_PID")
wait_port "$SINK_PORT"

IMAP_PORT=$(free_port); LSMTP_PORT=$(free_port); POP3_PORT=$(free_port)
LEGACY_SMTP_PORT=$LSMTP_PORT LEGACY_IMAP_PORT=$IMAP_PORT LEGACY_POP3_PORT=$POP3_PORT \
    taskset -c "$LOAD_CPU" bash "$ROOT/scripts/legacy.sh" start "$LEGACY_DIR" --watch $$ \
    >"$WORK/legacy-start.log" 2>&1 || { cat "$WORK/legacy-start.log" >&2; die "legacy.sh start failed"; }
MAILDIR=$(sed -n 's/^LEGACY_MAILDIR_ALICE=//p' "$LEGACY_DIR/legacy.env" | tr -d '"')
mkdir -p "$MAILDIR/new"
# The prepared message: 10 MB of 78-byte CRLF lines (RFC 5322 line length).
python3 - "$MAILDIR/new/1.bench.mailmoat:2," <<'EOF'
import sys
line = b"x" * 76 + b"\r\n"
head = b"From: bench@example.test\r\nTo: alice@example.test\r\nSubject: bench 10MB\r\n\r\n"
with open(sys.argv[1], "wb") as f:
    f.write(head + line * ((10_000_000 - len(head)) // len(line)))
EOF
chown --reference="$MAILDIR" "$MAILDIR/new/"* 2>/dev/null || true

# ------------------------------------------------------------------ mailmoat (core 0)
# The glibc tuning the systemd unit sets (see config/mailmoat.service), read from it.
UNIT_TUNABLES=$(sed -n 's/^Environment=GLIBC_TUNABLES=//p' "$ROOT/config/mailmoat.service")
[ -n "$UNIT_TUNABLES" ] || die "config/mailmoat.service sets no GLIBC_TUNABLES"
MM_TUNABLES=$UNIT_TUNABLES
[ "$GLIBC_DEFAULT" = 1 ] && MM_TUNABLES=
# start_mailmoat NAME CERT KEY [TUNABLES [LIMITS [BINARY]]] -> sets PID_<NAME>, and ports
# in SUB_<NAME> etc. LIMITS: more `limits:` lines (YAML, indented two spaces). BINARY:
# this tree's mailmoat unless given (the --baseline copy).
start_mailmoat() {
    local name=$1 cert=$2 key=$3 tunables=${4-$MM_TUNABLES} limits=${5-} bin=${6:-$MM}
    local sub smtps imap imaps mx pid
    sub=$(free_port); smtps=$(free_port); imap=$(free_port); imaps=$(free_port); mx=$(free_port)
    cat >"$WORK/$name.yaml" <<EOF
tls:
  certificates:
    - { cert: $cert, key: $key }
listeners:
  - { name: submission, protocol: smtp, listen: "127.0.0.1:$sub", tls: starttls, upstream: "127.0.0.1:$SINK_PORT" }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:$smtps", tls: implicit, upstream: "127.0.0.1:$SINK_PORT" }
  - { name: imap, protocol: imap, listen: "127.0.0.1:$imap", tls: starttls, upstream: "127.0.0.1:$IMAP_PORT" }
  - { name: imaps, protocol: imap, listen: "127.0.0.1:$imaps", tls: implicit, upstream: "127.0.0.1:$IMAP_PORT" }
  - { name: mx, protocol: smtp, listen: "127.0.0.1:$mx", tls: starttls, policy: auth_requires_tls, upstream: "127.0.0.1:$SINK_PORT" }
limits:
  max_connections: 20000
  max_connections_per_client: 20000
$limits
log: { level: warn }
EOF
    env ${tunables:+GLIBC_TUNABLES=$tunables} taskset -c "$PROXY_CPU" "$bin" run -c "$WORK/$name.yaml" \
        >>"$WORK/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$sub"; wait_port "$smtps"; wait_port "$imap"; wait_port "$imaps"; wait_port "$mx"
    printf -v "PID_$name" %s "$pid"
    printf -v "SUB_$name" %s "$sub"
    printf -v "SMTPS_$name" %s "$smtps"
    printf -v "IMAP_$name" %s "$imap"
    printf -v "IMAPS_$name" %s "$imaps"
    printf -v "MX_$name" %s "$mx"
}
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
# start_haproxy NAME -> sets PID_<NAME>, SMTPS_<NAME> and IMAPS_<NAME>: HAProxy in front of
# the same upstreams as mailmoat's implicit listeners (smtps: smtp-sink, imaps: Dovecot),
# with the same certificate chain and key as the ECDSA instance, on the same core.
# What keeps the comparison fair, and what HAProxy is left with as shipped:
# - one process, one thread: nbthread 1; run in the foreground (-db) without
#   master-worker, so the pid is HAProxy's only process and every thread's CPU is read.
# - TLS 1.3 only, TLS_AES_128_GCM_SHA256 (mailmoat's first choice; HAProxy's own first
#   would be AES-256-GCM) and X25519, the one group the generator offers.
# - no `log` line: nothing is logged (mailmoat runs at level warn: nothing either).
# - mode tcp: a blind relay, no protocol work; buffers (tune.bufsize 16 KiB), TLS records
#   and the TLS session cache (tune.ssl.cachesize) as shipped. HAProxy sends two TLS 1.3
#   session tickets per full handshake where mailmoat sends one (OpenSSL's default; 2.6
#   has no setting for it, and tune.ssl.cachesize 0 sends none): the probe printed with
#   the table counts them.
# - glibc's defaults (no GLIBC_TUNABLES), as Debian's unit starts it.
start_haproxy() {
    local name=$1 smtps imaps pid
    smtps=$(free_port); imaps=$(free_port)
    cat >"$WORK/$name.cfg" <<EOF
global
    nbthread 1
    maxconn $HAPROXY_MAXCONN
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
    ssl-default-bind-curves X25519
defaults
    mode tcp
    timeout connect 10s
    timeout client 300s
    timeout server 300s
frontend smtps
    bind 127.0.0.1:$smtps ssl crt $CERTS/haproxy-ecdsa.pem
    default_backend smtp_sink
frontend imaps
    bind 127.0.0.1:$imaps ssl crt $CERTS/haproxy-ecdsa.pem
    default_backend dovecot
backend smtp_sink
    server sink 127.0.0.1:$SINK_PORT
backend dovecot
    server dovecot 127.0.0.1:$IMAP_PORT
EOF
    "$HAPROXY_BIN" -c -q -f "$WORK/$name.cfg" >>"$WORK/$name.log" 2>&1 ||
        { cat "$WORK/$name.log" >&2; die "haproxy refuses $WORK/$name.cfg"; }
    taskset -c "$PROXY_CPU" "$HAPROXY_BIN" -db -f "$WORK/$name.cfg" >>"$WORK/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$smtps"; wait_port "$imaps"
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "haproxy exited"; }
    printf -v "PID_$name" %s "$pid"
    printf -v "SMTPS_$name" %s "$smtps"
    printf -v "IMAPS_$name" %s "$imaps"
}
# threads PID: how many threads the process runs, and their names.
threads() {
    local t names=()
    for t in /proc/"$1"/task/*/comm; do names+=("$(cat "$t")"); done
    echo "${#names[@]} thread$([ "${#names[@]}" = 1 ] || echo s) ($(printf '%s\n' "${names[@]}" | sort | uniq -c |
        awk '{printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1}'))"
}
# tls_probe LABEL PORT: what one openssl s_client handshake (its default offer) gets from
# an implicit-TLS listener: version, suite, group, signature, session tickets, bytes. Its
# input stays open a second, for the tickets (sent after the handshake) to arrive.
tls_probe() {
    local out
    out=$(sleep 1 | timeout 10 openssl s_client -connect "127.0.0.1:$2" -servername mail.example.test \
        -CAfile "$CERTS/ca.pem" -msg 2>&1) || true
    awk -v label="$1" '
        /^New, / { sub(/^New, /, ""); suite = $0 }
        /^Server Temp Key:/ { sub(/^Server Temp Key: /, ""); group = $0 }
        /^Peer signature type:/ { sig = $4 }
        /NewSessionTicket/ { tickets++ }
        /^SSL handshake has read/ { bytes = $5 " bytes in, " $9 " out" }
        END { printf "%s: %s, %s, %s signature, %d session tickets, handshake %s\n",
              label, suite, group, sig, tickets, bytes }' <<<"$out"
}
start_mailmoat ecdsa "$CERTS/mail.example.test.pem" "$CERTS/mail.example.test.key"
start_mailmoat rsa "$CERTS/rsa.pem" "$CERTS/rsa.key"
# The same as ecdsa, with glibc's own defaults: what the unit's tuning is worth.
[ -n "$MM_TUNABLES" ] && start_mailmoat glibc "$CERTS/mail.example.test.pem" "$CERTS/mail.example.test.key" ""
# --baseline: the same two, run by the baseline binary (same config, environment, core).
if [ -n "$BASE_MM" ]; then
    start_mailmoat base_ecdsa "$CERTS/mail.example.test.pem" "$CERTS/mail.example.test.key" \
        "$MM_TUNABLES" "" "$BASE_MM"
    start_mailmoat base_rsa "$CERTS/rsa.pem" "$CERTS/rsa.key" "$MM_TUNABLES" "" "$BASE_MM"
fi
# --haproxy: HAProxy for the session, bulk and FETCH scenarios (idle_N_implicit starts
# fresh instances of its own).
HAP_INFO=
PROXY_THREADS="mailmoat: $(threads "$PID_ecdsa")"
# shellcheck disable=SC2154 # *_hap, *_ecdsa: set by start_haproxy and start_mailmoat
if [ "$HAPROXY" = 1 ]; then
    start_haproxy hap
    # (sed reads all of it: head would leave haproxy a closed pipe, SIGPIPE and pipefail.)
    HAP_INFO="$("$HAPROXY_BIN" -v | sed -n '1s/^\(HAProxy version [^ ]*\).*/\1/p')"
    HAP_INFO+=", $("$HAPROXY_BIN" -vv | sed -n 's/^Running on OpenSSL version : //p')"
    PROXY_THREADS+="; haproxy: $(threads "$PID_hap")"
    {
        tls_probe "mailmoat smtps" "$SMTPS_ecdsa"
        tls_probe "haproxy smtps" "$SMTPS_hap"
        tls_probe "mailmoat imaps" "$IMAPS_ecdsa"
        tls_probe "haproxy imaps" "$IMAPS_hap"
    } >"$WORK/tls-probe.txt"
fi

# ------------------------------------------------------------------ runs
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
ERRORS=0

# gen SCENARIO SIDE REP ARGS... : one generator run on the load core, its JSON line kept.
gen() {
    local scenario=$1 side=$2 rep=$3 line rc=0
    shift 3
    line=$(taskset -c "$LOAD_CPU" "$GEN" --label "$scenario|$side|$rep" --timeout 240 "$@" \
        2>>"$WORK/generator.err") || rc=$?
    if [ -z "$line" ]; then
        line="{\"label\":\"$scenario|$side|$rep\",\"errors\":-1,\"failed\":\"no output, exit $rc\"}"
    fi
    [ "$rc" = 0 ] || { ERRORS=$((ERRORS + 1)); log "$scenario/$side rep $rep: exit $rc (see $WORK/generator.err)"; }
    echo "$line" >>"$RESULTS"
}

# pair SCENARIO "DIRECT ARGS" "MAILMOAT ARGS" [SIDE=ARGS...]: REPS repetitions of a run
# of each side: direct, mailmoat, then each further SIDE (baseline, glibc_default,
# haproxy) in the order given, the order reversed every other repetition (direct,
# mailmoat, baseline, then baseline, mailmoat, direct, ...), so that no side always goes
# first or last. One run at a time, always. Empty SIDE=ARGS words are skipped.
pair() {
    local scenario=$1 direct=$2 proxied=$3 rep spec i
    shift 3
    want "$scenario" || return 0
    local sides=(direct mailmoat) args=("$direct" "$proxied") extra=()
    for spec in "$@"; do
        [ -n "$spec" ] || continue
        sides+=("${spec%%=*}"); args+=("${spec#*=}"); extra+=("${spec%%=*}")
    done
    log "scenario $scenario ($REPS repetitions${extra[0]:+, each also with ${extra[*]}})"
    for rep in $(seq 1 "$REPS"); do
        for i in "${!sides[@]}"; do
            [ $((rep % 2)) = 1 ] || i=$((${#sides[@]} - 1 - i))
            # shellcheck disable=SC2086
            gen "$scenario" "${sides[$i]}" "$rep" ${args[$i]}
        done
    done
}

CA="--ca $CERTS/ca.pem"
# Direct runs also read smtp-sink's own CPU: a minimal C server's cost of the same
# dialogue, one plaintext leg, with its client on its own core (no cross-core wake-ups).
SINK="--addr 127.0.0.1:$SINK_PORT --tls none --proxy-pid $SINK_PID"
STARTED=$(date +%s)

# Full sessions: EHLO, STARTTLS, EHLO, MAIL/RCPT/DATA (2 KB), QUIT. smtp-sink answers
# AUTH with 250 instead of 235, so these sessions run without AUTH (the smoke test
# covers AUTH against an upstream that answers it properly).
HS="smtp --sessions $N_HANDSHAKE --concurrency 20 --size 2048"
# --baseline: the generator's arguments for the baseline instance of KIND (ecdsa, rsa)
# and its LISTENER (SUB, SMTPS), empty without --baseline.
base_args() {
    local pid_var=PID_base_$1 port_var=${2}_base_$1
    [ -z "$BASE_MM" ] || echo "--addr 127.0.0.1:${!port_var} --proxy-pid ${!pid_var}"
}
BASE_SUB_ECDSA=$(base_args ecdsa SUB); BASE_SUB_RSA=$(base_args rsa SUB)
BASE_SMTPS_ECDSA=$(base_args ecdsa SMTPS)
# --haproxy: the further sides of an implicit-TLS scenario, as pair's SIDE=ARGS words in
# HAP_SIDES: glibc_default (the instance started without GLIBC_TUNABLES; none with
# --glibc-default, where every instance runs so) and haproxy. ARGS: the generator's
# arguments but the address; LISTENER: SMTPS or IMAPS.
hap_sides() {
    local gen_args=$1 plain_port=${2}_glibc hap_port=${2}_hap
    HAP_SIDES=()
    [ "$HAPROXY" = 1 ] || return 0
    [ -z "$MM_TUNABLES" ] ||
        HAP_SIDES+=("glibc_default=$gen_args --addr 127.0.0.1:${!plain_port} --proxy-pid $PID_glibc")
    HAP_SIDES+=("haproxy=$gen_args --addr 127.0.0.1:${!hap_port} --proxy-pid $PID_hap")
}
pair smtp_starttls_ecdsa "$HS $SINK" "$HS $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa" \
    ${BASE_MM:+"baseline=$HS $CA $BASE_SUB_ECDSA"}
# The same sessions from a client that pipelines MAIL, RCPT and DATA (RFC 2920), as MTAs
# do; the one-command-at-a-time dialogue above is what most mail user agents send.
pair smtp_starttls_ecdsa_pipelined "$HS --pipelining $SINK" \
    "$HS --pipelining $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa" \
    ${BASE_MM:+"baseline=$HS --pipelining $CA $BASE_SUB_ECDSA"}
pair smtp_starttls_rsa "$HS $SINK" "$HS $CA --addr 127.0.0.1:$SUB_rsa --proxy-pid $PID_rsa" \
    ${BASE_MM:+"baseline=$HS $CA $BASE_SUB_RSA"}
# --haproxy: also HAProxy and the instance without the glibc tuning.
hap_sides "$HS $CA --tls implicit" SMTPS
pair smtp_implicit_ecdsa "$HS $SINK" "$HS $CA --tls implicit --addr 127.0.0.1:$SMTPS_ecdsa --proxy-pid $PID_ecdsa" \
    ${BASE_MM:+"baseline=$HS $CA --tls implicit $BASE_SMTPS_ECDSA"} "${HAP_SIDES[@]}"
# The same sessions one at a time: the latency a proxy adds to a whole session, handshake
# included (at concurrency 20 a session's p50 is mostly its wait for the proxy's core).
SEQ="smtp --sessions $N_SEQUENTIAL --concurrency 1 --size 2048"
hap_sides "$SEQ $CA --tls implicit" SMTPS
pair smtp_implicit_ecdsa_sequential "$SEQ $SINK" \
    "$SEQ $CA --tls implicit --addr 127.0.0.1:$SMTPS_ecdsa --proxy-pid $PID_ecdsa" "${HAP_SIDES[@]}"
# The baseline instances are done: the rest runs as without --baseline.
# shellcheck disable=SC2154 # PID_base_*: set by start_mailmoat
if [ -n "$BASE_MM" ]; then
    stop_pid "$PID_base_ecdsa"; stop_pid "$PID_base_rsa"
fi
# Resumption: a client session cache (TLS 1.3 tickets); baseline = the same run with
# full handshakes. Concurrency 4 so that a ticket is there for (almost) every session.
RS="smtp --sessions $N_RESUME --concurrency 4 --size 2048"
for kind in ecdsa rsa; do
    pid_var=PID_$kind; sub_var=SUB_$kind
    pair "smtp_resumed_$kind" "$RS $CA --addr 127.0.0.1:${!sub_var} --proxy-pid ${!pid_var}" \
        "$RS $CA --resume --addr 127.0.0.1:${!sub_var} --proxy-pid ${!pid_var}"
done
# Bulk DATA through TLS.
BULK="smtp --sessions 2 --concurrency 1 --size $BULK_SIZE --messages $BULK_MSGS"
pair smtp_bulk_data "$BULK $SINK" "$BULK $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa"
if [ -n "$MM_TUNABLES" ]; then
    pair smtp_bulk_data_glibc_default "$BULK $SINK" \
        "$BULK $CA --addr 127.0.0.1:$SUB_glibc --proxy-pid $PID_glibc"
fi
# The same through the implicit-TLS listener (smtps); --haproxy: and through HAProxy.
hap_sides "$BULK $CA --tls implicit" SMTPS
pair smtp_bulk_data_implicit "$BULK $SINK" \
    "$BULK $CA --tls implicit --addr 127.0.0.1:$SMTPS_ecdsa --proxy-pid $PID_ecdsa" "${HAP_SIDES[@]}"
# IMAP FETCH of the 10 MB message (STARTTLS, LOGIN, SELECT, FETCH xN, LOGOUT).
IM="imap --sessions 2 --concurrency 1 --login alice@example.test:alice-secret-pw --fetches $IMAP_FETCHES"
pair imap_fetch_10mb "$IM --addr 127.0.0.1:$IMAP_PORT --tls none" \
    "$IM $CA --addr 127.0.0.1:$IMAP_ecdsa --proxy-pid $PID_ecdsa"
# The same through the implicit-TLS listener (imaps); --haproxy: and through HAProxy.
hap_sides "$IM $CA --tls implicit" IMAPS
pair imap_fetch_10mb_implicit "$IM --addr 127.0.0.1:$IMAP_PORT --tls none" \
    "$IM $CA --tls implicit --addr 127.0.0.1:$IMAPS_ecdsa --proxy-pid $PID_ecdsa" "${HAP_SIDES[@]}"
[ -z "$MM_TUNABLES" ] || stop_pid "$PID_glibc"
[ "$HAPROXY" = 0 ] || stop_pid "$PID_hap"
# Latency: one established session, sequential MAIL/RCPT/DATA(2 KB)/RSET transactions.
LAT="latency --sessions 1 --concurrency 1 --messages $LAT_TX --size 2048"
pair smtp_latency "$LAT $SINK" "$LAT $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa"
# Many concurrent STARTTLS sessions, all at once.
CONC="smtp --sessions $N_CONC --concurrency $N_CONC --size 2048 --step-timeout 60"
pair smtp_concurrent "$CONC $SINK" "$CONC $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa"

# Idle sessions: a fresh mailmoat each time (a used one keeps freed memory around),
# N sessions held open after STARTTLS and EHLO; growth of its RSS per session. The same
# through the implicit-TLS listener (smtps): idle_N_implicit; --haproxy: and through a
# fresh HAProxy, and a fresh mailmoat without the glibc tuning.
stop_pid "$PID_rsa"
# idle_run SCENARIO SIDE REP: one repetition, on a fresh instance of SIDE's kind:
# mailmoat (this tree's binary), baseline (--baseline's), glibc_default (this tree's,
# without GLIBC_TUNABLES), haproxy. idle_N: STARTTLS (submission); idle_N_implicit:
# implicit TLS (smtps).
idle_run() {
    local scenario=$1 side=$2 rep=$3 tls=starttls port_var pid_var
    local cert=$CERTS/mail.example.test.pem key=$CERTS/mail.example.test.key
    [ "$scenario" = "idle_$N_IDLE" ] || tls=implicit
    case "$side" in
        mailmoat) start_mailmoat idle "$cert" "$key" "$MM_TUNABLES" "" ;;
        baseline) start_mailmoat idle "$cert" "$key" "$MM_TUNABLES" "" "$BASE_MM" ;;
        glibc_default) start_mailmoat idle "$cert" "$key" "" "" ;;
        haproxy) start_haproxy idle ;;
        *) die "idle_run: unknown side $side" ;;
    esac
    pid_var=PID_idle; port_var=SMTPS_idle
    [ "$tls" = implicit ] || port_var=SUB_idle
    sleep 0.5
    # shellcheck disable=SC2086
    gen "$scenario" "$side" "$rep" idle --sessions "$N_IDLE" --concurrency 50 --settle 2 \
        $CA --tls "$tls" --addr "127.0.0.1:${!port_var}" --proxy-pid "${!pid_var}"
    stop_pid "${!pid_var}"
}
# idle_scenario SCENARIO SIDE...: IDLE_REPS repetitions, each side once per repetition on
# its own fresh instance, never two at once, the order reversed every other repetition.
idle_scenario() {
    local scenario=$1 rep i
    shift
    local sides=("$@")
    want "$scenario" || return 0
    log "scenario $scenario ($IDLE_REPS repetitions, a fresh instance of each of: ${sides[*]})"
    for rep in $(seq 1 "$IDLE_REPS"); do
        for i in "${!sides[@]}"; do
            [ $((rep % 2)) = 1 ] || i=$((${#sides[@]} - 1 - i))
            idle_run "$scenario" "${sides[$i]}" "$rep"
        done
    done
}
idle_scenario "idle_$N_IDLE" mailmoat ${BASE_MM:+baseline}
IDLE_HAP_SIDES=()
if [ "$HAPROXY" = 1 ]; then
    [ -z "$MM_TUNABLES" ] || IDLE_HAP_SIDES+=(glibc_default)
    IDLE_HAP_SIDES+=(haproxy)
fi
idle_scenario "idle_${N_IDLE}_implicit" mailmoat "${IDLE_HAP_SIDES[@]}"
# Flooding clients that never read: a fresh mailmoat each time; N_FLOOD connections to
# its MX listener (no pre-TLS command budget there) send bare LF lines and unknown verbs,
# answered by mailmoat itself, and never read a reply, while 20 full STARTTLS sessions
# run through its submission listener; growth of its RSS per attacking connection,
# sampled with the attackers still connected.
# Twice: with the default limits (limits.max_errors closes each attacker after 20 error
# replies), and with that limit out of the way, so that the bound on unwritten replies
# alone holds the memory.
for flood in "flood_$N_FLOOD" "flood_${N_FLOOD}_no_error_limit"; do
    want "$flood" || continue
    limits=""
    [ "$flood" != "flood_$N_FLOOD" ] && limits="  max_errors: 4000000000"
    log "scenario $flood ($FLOOD_REPS repetitions, fresh mailmoat each)"
    for rep in $(seq 1 "$FLOOD_REPS"); do
        start_mailmoat flood "$CERTS/mail.example.test.pem" "$CERTS/mail.example.test.key" \
            "$MM_TUNABLES" "$limits"
        sleep 0.5
        gen "$flood" mailmoat "$rep" flood --attackers "$N_FLOOD" --flood-bytes 16777216 \
            --stall 2 --settle 2 --sessions 20 --concurrency 4 --size 2048 \
            $CA --addr "127.0.0.1:$SUB_flood" --flood-addr "127.0.0.1:$MX_flood" \
            --proxy-pid "$PID_flood"
        stop_pid "$PID_flood"
    done
done
ELAPSED=$(( $(date +%s) - STARTED ))

# ------------------------------------------------------------------ table
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
TLS_PROBE=
[ -f "$WORK/tls-probe.txt" ] && TLS_PROBE=$(cat "$WORK/tls-probe.txt")
python3 - "$RESULTS" "$REPS" "$ELAPSED" "$CORES" "$LOADAVG" "$N_IDLE" "$MM_TUNABLES" "$N_FLOOD" \
    "$BASE_INFO" "$HAP_INFO" "$PROXY_THREADS" "$TLS_PROBE" <<'EOF'
import json, statistics, sys
path, reps, elapsed, cores, loadavg, n_idle, tunables, n_flood, base_info = sys.argv[1:10]
hap_info, proxy_threads, tls_probe = sys.argv[10:13]
runs = {}
errors = []
for line in open(path):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    scenario, side, rep = r["label"].split("|")
    runs.setdefault((scenario, side), []).append(r)
    if r.get("errors") != 0 or r.get("timed_out"):
        errors.append(f'{scenario}/{side} rep {rep}: errors={r.get("errors")} '
                      f'{(r.get("error_samples") or [r.get("failed", "")])[:1]}')

def get(r, path):
    if callable(path):
        try:
            return path(r)
        except (KeyError, TypeError, ZeroDivisionError):
            return None
    for key in path.split("."):
        if not isinstance(r, dict) or r.get(key) is None:
            return None
        r = r[key]
    return r

def med(scenario, side, path):
    vals = [get(r, path) for r in runs.get((scenario, side), [])]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None

def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"

rows = []
# The mailmoat sides HAProxy is compared with in SCENARIO, with their row labels: the
# instance without the glibc tuning first, then the tuned one; with --glibc-default,
# mailmoat's own runs, which are without it.
def hap_pairs(scenario):
    if (scenario, "glibc_default") not in runs:
        return [("mailmoat", "haproxy; mailmoat: glibc defaults")]
    return [("glibc_default", "haproxy; mailmoat: glibc defaults"),
            ("mailmoat", "haproxy; mailmoat: GLIBC_TUNABLES")]
# --baseline: mailmoat's own metrics compared with the baseline binary (CPU, memory),
# for the per-repetition list under the table.
vs_base = []
# --haproxy: the same for mailmoat (without the glibc tuning) against HAProxy.
vs_hap = []
def row(scenario, metric, path, target="", base_side="direct", base_label="direct",
        scale=1.0, digits=1, ratio=True, baseline=False, haproxy=False):
    if not any(sc == scenario for (sc, _) in runs):
        return  # not run (--only)
    b = med(scenario, base_side, path) if base_side else None
    m = med(scenario, "mailmoat", path)
    b = None if b is None else b * scale
    m = None if m is None else m * scale
    r = f"{m / b:.2f}" if ratio and b and m is not None else "-"
    rows.append((scenario, metric, base_label if base_side else "-", fmt(b, digits), fmt(m, digits), r, target))
    # baseline=True: one more row, the baseline binary's median (--baseline runs only).
    if baseline and (scenario, "baseline") in runs:
        b = med(scenario, "baseline", path)
        b = None if b is None else b * scale
        r = f"{m / b:.2f}" if ratio and b and m is not None else "-"
        rows.append((scenario, metric, "baseline binary", fmt(b, digits), fmt(m, digits), r, ""))
        if ratio and isinstance(path, str) and path.startswith("proxy."):
            vs_base.append((scenario, metric, path, scale, digits))
    # haproxy=True: HAProxy's median against mailmoat's without the glibc tuning (the
    # glibc_default side; mailmoat's own with --glibc-default), then against the tuned
    # instance (--haproxy runs only).
    if haproxy and (scenario, "haproxy") in runs:
        if ratio and isinstance(path, str) and path.startswith("proxy."):
            vs_hap.append((scenario, metric, path, scale, digits))
        h = med(scenario, "haproxy", path)
        h = None if h is None else h * scale
        # (A count, not a ratio: against the instance without the tuning only.)
        for side, label in hap_pairs(scenario)[:None if ratio else 1]:
            m = med(scenario, side, path)
            m = None if m is None else m * scale
            r = f"{m / h:.2f}" if ratio and h and m is not None else "-"
            rows.append((scenario, metric, label, fmt(h, digits), fmt(m, digits), r, ""))

for s, target in [("smtp_starttls_ecdsa", "<= 250"), ("smtp_starttls_rsa", "<= 440"),
                  ("smtp_implicit_ecdsa", "")]:
    row(s, "server CPU µs/session", "proxy.cpu_us_per_session", target, base_label="smtp-sink",
        baseline=True, haproxy=True)
    row(s, "of which kernel µs/session", lambda r: r["proxy"]["cpu_system_us"] / r["ok"],
        base_label="smtp-sink", baseline=True, haproxy=True)
    row(s, "sessions/s", "sessions_per_s", digits=0, baseline=True, haproxy=True)
    row(s, "session p50 ms", "session_latency_us.p50", scale=1e-3, digits=2, baseline=True,
        haproxy=True)
    row(s, "generator CPU µs/session", "generator.cpu_us_per_session", digits=0)
# The latency each proxy adds to a whole session (handshake included), one session at a
# time: its median p50 less the direct runs' median p50, in the same scenario.
def added_p50(scenario, side):
    d = med(scenario, "direct", "session_latency_us.p50")
    m = med(scenario, side, "session_latency_us.p50")
    return None if d is None or m is None else (m - d) / 1000
s = "smtp_implicit_ecdsa_sequential"
row(s, "server CPU µs/session", "proxy.cpu_us_per_session", base_label="smtp-sink", haproxy=True)
row(s, "session p50 ms", "session_latency_us.p50", scale=1e-3, digits=2, haproxy=True)
row(s, "session p99 ms", "session_latency_us.p99", scale=1e-3, digits=2, haproxy=True)
if (s, "mailmoat") in runs:
    rows.append((s, "added session p50 ms vs direct", "-", "-", fmt(added_p50(s, "mailmoat"), 2),
                 "-", ""))
if (s, "haproxy") in runs:
    h = added_p50(s, "haproxy")
    for side, label in hap_pairs(s):
        m = added_p50(s, side)
        r = f"{m / h:.2f}" if h and m is not None and h > 0 else "-"
        rows.append((s, "added session p50 ms vs direct", label, fmt(h, 2), fmt(m, 2), r, ""))
s = "smtp_starttls_ecdsa_pipelined"
row(s, "server CPU µs/session", "proxy.cpu_us_per_session", base_label="smtp-sink",
    baseline=True)
row(s, "of which kernel µs/session", lambda r: r["proxy"]["cpu_system_us"] / r["ok"],
    base_label="smtp-sink", baseline=True)
row(s, "sessions/s", "sessions_per_s", digits=0, baseline=True)
for s in ["smtp_resumed_ecdsa", "smtp_resumed_rsa"]:
    row(s, "mailmoat CPU µs/session", "proxy.cpu_us_per_session", "markedly cheaper",
        base_label="full handshake")
    row(s, "sessions resumed", "resumed", base_label="full handshake", digits=0, ratio=False)
    row(s, "sessions/s", "sessions_per_s", base_label="full handshake", digits=0)
# (No smtp-sink baseline here: it reads 4 KiB at a time, which is no floor for bulk.)
row("smtp_bulk_data", "mailmoat CPU ms/MB", "proxy.cpu_ms_per_mb", "<= 0.55", base_side=None, digits=3)
row("smtp_bulk_data", "of which kernel ms/MB", lambda r: r["proxy"]["cpu_system_us"] / 1000 / (r["bytes"] / 1e6), base_side=None, digits=3)
row("smtp_bulk_data", "MB/s", "mb_per_s")
if ("smtp_bulk_data_glibc_default", "mailmoat") in runs:
    row("smtp_bulk_data_glibc_default", "mailmoat CPU ms/MB", "proxy.cpu_ms_per_mb", base_side=None, digits=3)
for s in ("smtp_bulk_data_implicit", "imap_fetch_10mb", "imap_fetch_10mb_implicit"):
    row(s, "mailmoat CPU ms/MB", "proxy.cpu_ms_per_mb", "<= 0.55" if s == "imap_fetch_10mb" else "",
        base_side=None, digits=3, haproxy=True)
    row(s, "of which kernel ms/MB", lambda r: r["proxy"]["cpu_system_us"] / 1000 / (r["bytes"] / 1e6),
        base_side=None, digits=3, haproxy=True)
    row(s, "MB/s", "mb_per_s", haproxy=True)
row("smtp_latency", "transaction p50 ms", "transaction_latency_us.p50", "+<= 0.8 ms", scale=1e-3, digits=3)
row("smtp_latency", "transaction p99 ms", "transaction_latency_us.p99", scale=1e-3, digits=3)
row("smtp_latency", "mailmoat CPU µs/transaction",
    lambda r: r["proxy"]["cpu_us"] / r["transaction_latency_us"]["count"], base_side=None, digits=0)
row("smtp_latency", "transactions >= 35 ms", "transaction_latency_us.over_35ms", "0", digits=0, ratio=False)
def total(scenario, side, path):
    vals = [get(r, path) for r in runs.get((scenario, side), [])]
    return sum(v for v in vals if isinstance(v, (int, float)))
def total_row(scenario, metric, path, target=""):
    if not any(sc == scenario for (sc, _) in runs):
        return
    rows.append((scenario, metric, "direct", fmt(total(scenario, "direct", path), 0),
                 fmt(total(scenario, "mailmoat", path), 0), "-", target))
total_row("smtp_concurrent", "errors, all repetitions", "errors", "0")
total_row("smtp_concurrent", "listen queue overflows, all reps", "tcp_ext.ListenOverflows")
total_row("smtp_concurrent", "SYN cookies sent, all reps", "tcp_ext.SyncookiesSent")
row("smtp_concurrent", "ok sessions", "ok", digits=0, ratio=False)
row("smtp_concurrent", "session p99 ms", "session_latency_us.p99", scale=1e-3, digits=1)
row(f"idle_{n_idle}", "KiB resident per session", "proxy.rss_kib_per_conn", "<= 12", base_side=None,
    baseline=True)
row(f"idle_{n_idle}", "held open", "held_open", digits=0, base_side=None, baseline=True,
    ratio=False)
row(f"idle_{n_idle}_implicit", "KiB resident per session", "proxy.rss_kib_per_conn", base_side=None,
    haproxy=True)
row(f"idle_{n_idle}_implicit", "held open", "held_open", digits=0, base_side=None, ratio=False,
    haproxy=True)
for flood in (f"flood_{n_flood}", f"flood_{n_flood}_no_error_limit"):
    row(flood, "KiB resident per flooding connection", "proxy.rss_kib_per_attacker",
        "bounded", base_side=None)
    row(flood, "MiB accepted per flooding connection",
        lambda r: r["attacker_bytes_mean"] / 2**20, base_side=None, digits=2)
    row(flood, "flooding connections still open", "attackers_held_open", digits=0,
        base_side=None)
    row(flood, "well-behaved sessions ok (of 20)", "ok", digits=0, base_side=None)

lat_d = med("smtp_latency", "direct", "transaction_latency_us.p50")
lat_m = med("smtp_latency", "mailmoat", "transaction_latency_us.p50")
print()
print(f"mailmoat benchmark: medians of {reps} alternating repetitions; mailmoat on core 0, "
      f"generator and upstreams on core 1 ({cores} cores); {elapsed} s; load average at end {loadavg}")
print()
if base_info:
    print(f"--baseline: {base_info}; each \"baseline binary\" row compares the two, run one "
          f"at a time, in the same alternating repetitions (ratio = this tree / baseline)")
    print()
suites = sorted({k for rs in runs.values() for r in rs for k in (r.get("tls_suites") or {})})
kxs = sorted({r.get("kx") for (sc, side), rs in runs.items() if side == "mailmoat" for r in rs if r.get("kx")})
print(f"TLS negotiated: {', '.join(suites) or '-'}; key exchange offered by the generator: {', '.join(kxs)}")
print()
print(f"mailmoat's environment: GLIBC_TUNABLES={tunables} (as config/mailmoat.service sets it)"
      if tunables else "mailmoat's environment: glibc's defaults (--glibc-default)")
print()
hap_scenarios = sorted({sc for (sc, side) in runs if side == "haproxy"})
if hap_scenarios:
    print(f"--haproxy: {hap_info}, mode tcp, nbthread 1, no log, TLS 1.3 "
          f"TLS_AES_128_GCM_SHA256 X25519, the same certificate chain and key, upstreams "
          f"and core as mailmoat; {proxy_threads}. \"glibc_default\" is mailmoat started "
          f"without GLIBC_TUNABLES, as HAProxy is; \"haproxy\" rows: ratio = mailmoat / HAProxy.")
    # What each side negotiated with the generator, summed over the HAProxy scenarios.
    by_side = {}
    for (sc, side), rs in runs.items():
        if sc in hap_scenarios:
            for r in rs:
                for k, n in (r.get("tls_suites") or {}).items():
                    by_side.setdefault(side, {}).setdefault(k, 0)
                    by_side[side][k] += n
    print("TLS negotiated with the generator (key exchange: X25519, the only group it offers), "
          "in " + ", ".join(hap_scenarios) + ": " + "; ".join(
              f"{side} " + ", ".join(f"{k} x{n:,}" for k, n in sorted(suites.items()))
              for side, suites in sorted(by_side.items())))
    if tls_probe:
        print("openssl s_client (its default offer) against each implicit listener:")
        for line in tls_probe.splitlines():
            print(f"- {line}")
    print()
print("| scenario | metric | baseline | baseline median | mailmoat median | ratio | target |")
print("|---|---|---|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
if lat_d is not None and lat_m is not None:
    print(f"\nadded latency per SMTP transaction (p50): {(lat_m - lat_d) / 1000:.3f} ms (target <= 0.8 ms)")
if hap_scenarios:
    # The figures of issue 14's table, from this run: HAProxy against mailmoat's implicit
    # listeners, without the glibc tuning and (where it ran) with it.
    tuned = any(side == "glibc_default" for (sc, side) in runs if sc in hap_scenarios)
    figures = [
        ("full SMTP session incl. handshake, CPU µs", "smtp_implicit_ecdsa",
         lambda sc, side: med(sc, side, "proxy.cpu_us_per_session"), 1),
        ("bulk SMTP DATA, CPU ms/MB", "smtp_bulk_data_implicit",
         lambda sc, side: med(sc, side, "proxy.cpu_ms_per_mb"), 3),
        ("IMAP FETCH of 10 MB, CPU ms/MB", "imap_fetch_10mb_implicit",
         lambda sc, side: med(sc, side, "proxy.cpu_ms_per_mb"), 3),
        (f"idle TLS connection, {int(n_idle):,} open, KiB RSS each", f"idle_{n_idle}_implicit",
         lambda sc, side: med(sc, side, "proxy.rss_kib_per_conn"), 1),
        ("added session p50 vs direct, one at a time, ms", "smtp_implicit_ecdsa_sequential",
         added_p50, 2),
    ]
    print("\nmailmoat (implicit-TLS listeners) vs HAProxy, this run, ratio = mailmoat / HAProxy:\n")
    head = "| figure (proxy per unit) | HAProxy | mailmoat, glibc defaults | ratio |"
    if tuned:
        head += " mailmoat, GLIBC_TUNABLES | ratio |"
    print(head)
    print("|---|---:|---:|---:|" + ("---:|---:|" if tuned else ""))
    for label, sc, value, digits in figures:
        if (sc, "haproxy") not in runs:
            continue
        h = value(sc, "haproxy")
        cells = [label, fmt(h, digits)]
        for side, _ in hap_pairs(sc):
            m = value(sc, side)
            cells += [fmt(m, digits), f"{m / h:.2f}" if h and m is not None and h > 0 else "-"]
        if tuned and len(cells) < 6:
            cells += ["-", "-"]
        print("| " + " | ".join(cells) + " |")
# Each repetition's pair of runs (the two sides run one after the other), to see the noise
# the medians hide: SIDE's value / OTHER's in each repetition.
def per_repetition(title, entries, side, other):
    if not entries:
        return
    print(f"\n{title}, per repetition:")
    for scenario, metric, path, scale, digits in entries:
        by_rep = {}
        for sd in (side(scenario), other):
            for r in runs.get((scenario, sd), []):
                v = get(r, path)
                by_rep.setdefault(r["label"].split("|")[2], {})[sd] = \
                    v * scale if isinstance(v, (int, float)) else None
        cells, ratios = [], []
        for rep in sorted(by_rep, key=int):
            m, b = by_rep[rep].get(side(scenario)), by_rep[rep].get(other)
            q = m / b if m is not None and b else None
            if q is not None:
                ratios.append(q)
            cells.append(f"rep {rep} {fmt(m, digits)} / {fmt(b, digits)} = {fmt(q, 2)}")
        spread = f", ratios {min(ratios):.2f} to {max(ratios):.2f}" if ratios else ""
        print(f"- {scenario}, {metric}{spread}: " + "; ".join(cells))
per_repetition("this tree / baseline binary", vs_base, lambda sc: "mailmoat", "baseline")
per_repetition("mailmoat (glibc defaults) / HAProxy", vs_hap, lambda sc: hap_pairs(sc)[0][0],
               "haproxy")
print("\nCPU is the run time of the server's threads over the run (mailmoat's; in direct "
      "SMTP runs smtp-sink's, for its one plaintext leg) from /proc/PID/task/*/schedstat, "
      "divided by sessions or by message/literal MB (10^6 bytes); its kernel share is "
      "from /proc/PID/stat's 10 ms ticks.")
if errors:
    print(f"\nRUNS WITH ERRORS ({len(errors)}):")
    for e in errors:
        print(f"- {e}")
    sys.exit(1)
print("\nall runs: every reply verified, 0 errors")
EOF
