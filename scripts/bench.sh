#!/usr/bin/env bash
# Benchmarks mailmoat against its own plaintext upstream, in the same run, on loopback.
#
#   scripts/bench.sh [--quick] [--reps N] [--keep] [--glibc-default] [--only PREFIX]
#                    [--baseline PATH]
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
# Bounded: every generator run has a --timeout, the whole script a watchdog (25 min).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
REPS=
KEEP=0
GLIBC_DEFAULT=0
ONLY=
BASELINE=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --reps) REPS=${2:?--reps N}; shift ;;
        --keep) KEEP=1 ;;
        --glibc-default) GLIBC_DEFAULT=1 ;;
        --only) ONLY=${2:?--only PREFIX}; shift ;;
        --baseline) BASELINE=${2:?--baseline PATH}; shift ;;
        # The header comment above, whatever its length.
        -h | --help) awk 'NR > 1 { if (!/^#/) exit; print }' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    REPS=${REPS:-2}
    N_HANDSHAKE=400; N_RESUME=400; BULK_SIZE=2000000; BULK_MSGS=3; IMAP_FETCHES=3
    LAT_TX=500; N_IDLE=1000; N_CONC=300; IDLE_REPS=1; N_FLOOD=100; FLOOD_REPS=1
else
    REPS=${REPS:-5}
    N_HANDSHAKE=2000; N_RESUME=2000; BULK_SIZE=10000000; BULK_MSGS=4; IMAP_FETCHES=4
    LAT_TX=2000; N_IDLE=5000; N_CONC=1000; IDLE_REPS=3; N_FLOOD=100; FLOOD_REPS=3
fi
# Whether scenario NAME runs (--only).
want() { [ -z "$ONLY" ] || [[ "$1" == "$ONLY"* ]]; }

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
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((N_IDLE * 2 + 1000)) ] ||
    die "ulimit -n is $(ulimit -n); need $((N_IDLE * 2 + 1000)) for $N_IDLE idle sessions"

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
    local sub smtps imap mx pid
    sub=$(free_port); smtps=$(free_port); imap=$(free_port); mx=$(free_port)
    cat >"$WORK/$name.yaml" <<EOF
tls:
  certificates:
    - { cert: $cert, key: $key }
listeners:
  - { name: submission, protocol: smtp, listen: "127.0.0.1:$sub", tls: starttls, upstream: "127.0.0.1:$SINK_PORT" }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:$smtps", tls: implicit, upstream: "127.0.0.1:$SINK_PORT" }
  - { name: imap, protocol: imap, listen: "127.0.0.1:$imap", tls: starttls, upstream: "127.0.0.1:$IMAP_PORT" }
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
    wait_port "$sub"; wait_port "$smtps"; wait_port "$imap"; wait_port "$mx"
    printf -v "PID_$name" %s "$pid"
    printf -v "SUB_$name" %s "$sub"
    printf -v "SMTPS_$name" %s "$smtps"
    printf -v "IMAP_$name" %s "$imap"
    printf -v "MX_$name" %s "$mx"
}
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
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

# pair SCENARIO "DIRECT ARGS" "MAILMOAT ARGS" ["BASELINE ARGS"]: REPS alternating runs
# (order flips). With BASELINE ARGS, each repetition also runs the baseline binary, next
# to mailmoat's run: direct, mailmoat, baseline, then baseline, mailmoat, direct, ...
# (so the two binaries take turns at going first). One run at a time, always.
pair() {
    local scenario=$1 direct=$2 proxied=$3 baseline=${4-} rep
    want "$scenario" || return 0
    log "scenario $scenario ($REPS repetitions${baseline:+, each also with the baseline binary})"
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then
            # shellcheck disable=SC2086
            gen "$scenario" direct "$rep" $direct
            # shellcheck disable=SC2086
            gen "$scenario" mailmoat "$rep" $proxied
            # shellcheck disable=SC2086
            [ -z "$baseline" ] || gen "$scenario" baseline "$rep" $baseline
        else
            # shellcheck disable=SC2086
            [ -z "$baseline" ] || gen "$scenario" baseline "$rep" $baseline
            # shellcheck disable=SC2086
            gen "$scenario" mailmoat "$rep" $proxied
            # shellcheck disable=SC2086
            gen "$scenario" direct "$rep" $direct
        fi
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
pair smtp_starttls_ecdsa "$HS $SINK" "$HS $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa" \
    ${BASE_MM:+"$HS $CA $BASE_SUB_ECDSA"}
# The same sessions from a client that pipelines MAIL, RCPT and DATA (RFC 2920), as MTAs
# do; the one-command-at-a-time dialogue above is what most mail user agents send.
pair smtp_starttls_ecdsa_pipelined "$HS --pipelining $SINK" \
    "$HS --pipelining $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa" \
    ${BASE_MM:+"$HS --pipelining $CA $BASE_SUB_ECDSA"}
pair smtp_starttls_rsa "$HS $SINK" "$HS $CA --addr 127.0.0.1:$SUB_rsa --proxy-pid $PID_rsa" \
    ${BASE_MM:+"$HS $CA $BASE_SUB_RSA"}
pair smtp_implicit_ecdsa "$HS $SINK" "$HS $CA --tls implicit --addr 127.0.0.1:$SMTPS_ecdsa --proxy-pid $PID_ecdsa" \
    ${BASE_MM:+"$HS $CA --tls implicit $BASE_SMTPS_ECDSA"}
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
    stop_pid "$PID_glibc"
fi
# IMAP FETCH of the 10 MB message (STARTTLS, LOGIN, SELECT, FETCH xN, LOGOUT).
IM="imap --sessions 2 --concurrency 1 --login alice@example.test:alice-secret-pw --fetches $IMAP_FETCHES"
pair imap_fetch_10mb "$IM --addr 127.0.0.1:$IMAP_PORT --tls none" \
    "$IM $CA --addr 127.0.0.1:$IMAP_ecdsa --proxy-pid $PID_ecdsa"
# Latency: one established session, sequential MAIL/RCPT/DATA(2 KB)/RSET transactions.
LAT="latency --sessions 1 --concurrency 1 --messages $LAT_TX --size 2048"
pair smtp_latency "$LAT $SINK" "$LAT $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa"
# Many concurrent STARTTLS sessions, all at once.
CONC="smtp --sessions $N_CONC --concurrency $N_CONC --size 2048 --step-timeout 60"
pair smtp_concurrent "$CONC $SINK" "$CONC $CA --addr 127.0.0.1:$SUB_ecdsa --proxy-pid $PID_ecdsa"

# Idle sessions: a fresh mailmoat each time (a used one keeps freed memory around),
# N sessions held open after STARTTLS and EHLO; growth of its RSS per session.
stop_pid "$PID_rsa"
# idle_run NAME SIDE REP [BINARY]: one repetition, on a fresh instance NAME.
idle_run() {
    local name=$1 side=$2 rep=$3 bin=${4-} pid_var=PID_$1 sub_var=SUB_$1
    start_mailmoat "$name" "$CERTS/mail.example.test.pem" "$CERTS/mail.example.test.key" \
        "$MM_TUNABLES" "" "$bin"
    sleep 0.5
    # shellcheck disable=SC2086
    gen "idle_$N_IDLE" "$side" "$rep" idle --sessions "$N_IDLE" --concurrency 50 --settle 2 \
        $CA --addr "127.0.0.1:${!sub_var}" --proxy-pid "${!pid_var}"
    stop_pid "${!pid_var}"
}
if want "idle_$N_IDLE"; then
    log "scenario idle_${N_IDLE} ($IDLE_REPS repetitions, fresh mailmoat each${BASE_MM:+, each also with the baseline binary})"
    # --baseline: a fresh baseline instance too, after or (every other repetition) before
    # mailmoat's, never both at once.
    for rep in $(seq 1 "$IDLE_REPS"); do
        [ -z "$BASE_MM" ] || [ $((rep % 2)) = 1 ] || idle_run base_idle baseline "$rep" "$BASE_MM"
        idle_run idle mailmoat "$rep"
        [ -z "$BASE_MM" ] || [ $((rep % 2)) = 0 ] || idle_run base_idle baseline "$rep" "$BASE_MM"
    done
fi
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
python3 - "$RESULTS" "$REPS" "$ELAPSED" "$CORES" "$LOADAVG" "$N_IDLE" "$MM_TUNABLES" "$N_FLOOD" \
    "$BASE_INFO" <<'EOF'
import json, statistics, sys
path, reps, elapsed, cores, loadavg, n_idle, tunables, n_flood, base_info = sys.argv[1:10]
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
# --baseline: mailmoat's own metrics compared with the baseline binary (CPU, memory),
# for the per-repetition list under the table.
vs_base = []
def row(scenario, metric, path, target="", base_side="direct", base_label="direct",
        scale=1.0, digits=1, ratio=True, baseline=False):
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

for s, target in [("smtp_starttls_ecdsa", "<= 250"), ("smtp_starttls_rsa", "<= 440"),
                  ("smtp_implicit_ecdsa", "")]:
    row(s, "server CPU µs/session", "proxy.cpu_us_per_session", target, base_label="smtp-sink",
        baseline=True)
    row(s, "of which kernel µs/session", lambda r: r["proxy"]["cpu_system_us"] / r["ok"],
        base_label="smtp-sink", baseline=True)
    row(s, "sessions/s", "sessions_per_s", digits=0, baseline=True)
    row(s, "session p50 ms", "session_latency_us.p50", scale=1e-3, digits=2, baseline=True)
    row(s, "generator CPU µs/session", "generator.cpu_us_per_session", digits=0)
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
row("imap_fetch_10mb", "mailmoat CPU ms/MB", "proxy.cpu_ms_per_mb", "<= 0.55", base_side=None, digits=3)
row("imap_fetch_10mb", "of which kernel ms/MB", lambda r: r["proxy"]["cpu_system_us"] / 1000 / (r["bytes"] / 1e6), base_side=None, digits=3)
row("imap_fetch_10mb", "MB/s", "mb_per_s")
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
print("| scenario | metric | baseline | baseline median | mailmoat median | ratio | target |")
print("|---|---|---|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
if lat_d is not None and lat_m is not None:
    print(f"\nadded latency per SMTP transaction (p50): {(lat_m - lat_d) / 1000:.3f} ms (target <= 0.8 ms)")
if vs_base:
    # Each repetition's pair of runs, to see the noise the medians hide.
    print("\nthis tree / baseline binary, per repetition:")
    for scenario, metric, path, scale, digits in vs_base:
        by_rep = {}
        for side in ("mailmoat", "baseline"):
            for r in runs.get((scenario, side), []):
                v = get(r, path)
                by_rep.setdefault(r["label"].split("|")[2], {})[side] = \
                    v * scale if isinstance(v, (int, float)) else None
        cells, ratios = [], []
        for rep in sorted(by_rep, key=int):
            m, b = by_rep[rep].get("mailmoat"), by_rep[rep].get("baseline")
            q = m / b if m is not None and b else None
            if q is not None:
                ratios.append(q)
            cells.append(f"rep {rep} {fmt(m, digits)} / {fmt(b, digits)} = {fmt(q, 2)}")
        spread = f", ratios {min(ratios):.2f} to {max(ratios):.2f}" if ratios else ""
        print(f"- {scenario}, {metric}{spread}: " + "; ".join(cells))
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
