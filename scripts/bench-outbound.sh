#!/usr/bin/env bash
# Benchmarks the outbound relay (issue 15): messages per second and mailmoat's CPU per
# message through it, beside a direct delivery to the same MX, in the same run.
#
#   scripts/bench-outbound.sh [--quick] [--reps N] [--keep] [--mailmoat PATH]
#
# Starts the outbound lab (scripts/outbound-lab.sh: knot, a validating unbound, Postfix
# MXes with TLS) in a temporary directory and a mailmoat whose `outbound` section uses
# the lab's resolver and trusts the lab CA (extra_ca_file). Postfix's smtp-source then
# sends each scenario's messages (one message per SMTP session, S sessions at once) to:
#   direct   the lab MX mx1 (127.N.3.1:25) in plaintext: what the MX itself costs;
#   dane     mailmoat's outbound listener, recipients at dane.test (DANE-EE): for every
#            message mailmoat asks the resolver (MX, address and TLSA records), connects
#            to mx1, runs STARTTLS with a TLS 1.3 handshake checked against the TLSA
#            record, and relays the transaction live;
#   plain    the same for plain.test (unsigned: opportunistic TLS, any certificate).
# mailmoat opens one MX connection per transaction (no connection reuse yet), so every
# message through it pays a handshake with the MX.
# Scenarios: 10 KB messages (500) and 1 MB messages (50), each with 1 and with 8
# sessions at once (--quick: 20 and 8 messages, 1 repetition). Each repetition (--reps,
# default 5) runs the three sides one after the other, the order reversed every other
# repetition; the table shows medians. mailmoat runs pinned to core 0 with the
# environment config/mailmoat.service gives it, at log level warn; the lab and
# smtp-source run on core 1.
# Measured per run: messages/s (wall, from the first connection to smtp-source's exit,
# i.e. until the MX accepted the last message), mailmoat's CPU (the run time of its
# threads, /proc/PID/task/*/schedstat; the kernel share from /proc/PID/stat's 10 ms
# ticks), its peak resident memory (VmHWM, reset before each run through
# /proc/PID/clear_refs), the MX Postfix instance's CPU (every process of it, exited
# ones through the master's cutime/cstime; 10 ms ticks, delivery into the Maildir
# included) and the resolver's (unbound's threads).
# Every run is verified: smtp-source got a positive reply to every command (it aborts
# otherwise), exactly the messages sent arrived in mx1's Maildir, each one through
# mailmoat over TLS 1.3 (the MX's Received header), and mailmoat logged no warning.
# A run that lost mail or had an error fails the benchmark (exit 1) and the table says
# so. --mailmoat PATH uses that binary instead of building the release one (the smoke
# test passes its debug build). Root is needed (the lab). Bounded: smtp-source runs have
# a timeout, deliveries are awaited for at most 60 s, the whole script a watchdog (20 min).
# Exit codes: 0 done, 1 failed, 2 usage, 69 a program is missing (scripts/install-deps.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
REPS=
KEEP=0
MAILMOAT=
ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --reps) REPS=${2:?--reps N}; shift ;;
        --keep) KEEP=1 ;;
        --mailmoat) MAILMOAT=${2:?--mailmoat PATH}; shift ;;
        # The header comment above, whatever its length.
        -h | --help) awk 'NR > 1 { if (!/^#/) exit; print }' "$0"; exit 0 ;;
        *) echo "bench-outbound.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    REPS=${REPS:-1}
    N_SMALL=20; N_LARGE=8
else
    REPS=${REPS:-5}
    N_SMALL=500; N_LARGE=50
fi
case "$REPS" in '' | *[!0-9]* | 0) echo "bench-outbound.sh: --reps wants a number >= 1" >&2; exit 2 ;; esac
SMALL=10000
LARGE=1000000
SESSIONS=(1 8)
# The recipient domain of each side.
declare -A DOMAIN=([direct]=dane.test [dane]=dane.test [plain]=plain.test)
SIDES=(direct dane plain)

log() { echo "bench-outbound.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (the outbound lab binds ports 25 and 53)"
missing=()
for b in smtp-source taskset python3; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "missing: ${missing[*]} (scripts/install-deps.sh installs them)"
    exit 69
fi
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
PYTHON=$(python3 -c 'import sys; print(sys.executable)')

if [ -n "$MAILMOAT" ]; then
    if ! [ -f "$MAILMOAT" ] || ! [ -x "$MAILMOAT" ]; then
        die "--mailmoat $MAILMOAT: no executable file there"
    fi
    MM=$(realpath "$MAILMOAT")
else
    log "building the release binary"
    (cd "$ROOT" && cargo build --release -p mailmoat >&2)
    MM=${CARGO_TARGET_DIR:-$ROOT/target}/release/mailmoat
fi

# ------------------------------------------------------------------ cores
CORES=$(nproc)
if [ "$CORES" -ge 2 ]; then
    PROXY_CPU=0; LOAD_CPU=1
else
    PROXY_CPU=0; LOAD_CPU=0
    log "only one core: mailmoat, the lab and the load share it"
fi

# ------------------------------------------------------------------ workdir, cleanup
# Short: the lab's directory goes into unix socket paths (at most 70 characters).
WORK=$(mktemp -d /tmp/mmbo.XXXXXX)
LAB=$WORK/lab
MM_PID=
WATCHDOG=
cleanup() {
    if [ -n "$WATCHDOG" ]; then kill "$WATCHDOG" 2>/dev/null || true; fi
    if [ -n "$MM_PID" ]; then
        kill "$MM_PID" 2>/dev/null || true
        wait "$MM_PID" 2>/dev/null || true
    fi
    if [ -d "$LAB" ]; then
        bash "$ROOT/scripts/outbound-lab.sh" stop "$LAB" >/dev/null 2>&1 || true
    fi
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
# Watchdog: the whole run is bounded. Killed at the end, it takes its sleep with it.
(
    trap 'kill "$s" 2>/dev/null; exit 0' TERM
    sleep 1200 & s=$!
    wait "$s"
    log "watchdog: 20 minutes exceeded, stopping"
    kill -TERM $$
) 2>/dev/null &
WATCHDOG=$!

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
    local port=$1 i
    for i in $(seq 1 200); do
        # shellcheck disable=SC2016 # $1 is the inner shell's
        timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$port" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# ------------------------------------------------------------------ the lab (core 1)
RELAY_PORT=$(free_port)
started=
for attempt in 0 1 2 3 4 5 6 7; do
    # Apart from the tests' labs (10 + pid-based) by the pid too; 75: that NET is taken.
    net=$((10 + ($$ * 7 + attempt * 31) % 240))
    rc=0
    OUTBOUND_LAB_NET=$net OUTBOUND_LAB_RELAY_PORT=$RELAY_PORT \
        taskset -c "$LOAD_CPU" bash "$ROOT/scripts/outbound-lab.sh" start "$LAB" --watch $$ \
        >"$WORK/lab-start.log" 2>&1 || rc=$?
    case "$rc" in
        0) started=1; break ;;
        69) cat "$WORK/lab-start.log" >&2; exit 69 ;;
        75) continue ;;
        *) cat "$WORK/lab-start.log" >&2; die "outbound-lab.sh start failed (exit $rc)" ;;
    esac
done
[ -n "$started" ] || { cat "$WORK/lab-start.log" >&2; die "no free NET for the outbound lab"; }
# shellcheck source=/dev/null # written by outbound-lab.sh start
. "$LAB/lab.env"
MAILDIR=$LAB_MAILDIR_MX1
MX_MASTER=$(tr -d ' \n' <"$LAB/mx/spool/pid/master.pid")
UNBOUND=$(tr -d ' \n' <"$LAB/run/unbound.pid")
if [ -z "$MX_MASTER" ] || [ -z "$UNBOUND" ]; then die "no pid for the lab's MX or unbound"; fi

# ------------------------------------------------------------------ mailmoat (core 0)
UNIT_TUNABLES=$(sed -n 's/^Environment=GLIBC_TUNABLES=//p' "$ROOT/config/mailmoat.service")
[ -n "$UNIT_TUNABLES" ] || die "config/mailmoat.service sets no GLIBC_TUNABLES"
INBOUND_PORT=$(free_port)
mkdir -p "$WORK/mta-sts"
# One inbound listener, as every configuration has; nothing connects to it.
cat >"$WORK/mailmoat.yaml" <<EOF
tls:
  certificates:
    - { cert: $LAB_CERTS/mx1.pem, key: $LAB_CERTS/mx1.key }
listeners:
  - { name: mx, protocol: smtp, listen: "127.0.0.1:$INBOUND_PORT", tls: starttls, policy: require_tls, upstream: "127.0.0.1:9" }
outbound:
  listen: "127.0.0.1:$RELAY_PORT"
  hostname: relay.example.test
  resolver: "$LAB_RESOLVER"
  extra_ca_file: $LAB_CA
  mta_sts_cache_dir: $WORK/mta-sts
log: { level: warn }
EOF
env GLIBC_TUNABLES="$UNIT_TUNABLES" taskset -c "$PROXY_CPU" "$MM" run -c "$WORK/mailmoat.yaml" \
    >"$WORK/mailmoat.log" 2>&1 &
MM_PID=$!
wait_port "$RELAY_PORT" || { cat "$WORK/mailmoat.log" >&2; die "mailmoat's outbound listener never came up"; }
THREADS=$(find "/proc/$MM_PID/task" -mindepth 1 -maxdepth 1 | wc -l)

# ------------------------------------------------------------------ measuring
# One line: mailmoat's run time (µs, schedstat) and user and system ticks, the MX
# instance's ticks (its master and every descendant, plus what the master reaped), and
# unbound's run time (µs).
cat >"$WORK/procstat.py" <<'EOF'
import os, sys
mm, mx_master, unbound = sys.argv[1:4]
def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rfind(")") + 2:].split()
    # Fields 4 (ppid), 14-17 (utime stime cutime cstime) of the whole line.
    return int(rest[1]), [int(x) for x in rest[11:15]]
def run_time_us(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total // 1000
children = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            ppid, _ = stat(p)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(str(ppid), []).append(p)
mx_ticks = sum(stat(mx_master)[1][2:4])
todo = [mx_master]
while todo:
    p = todo.pop()
    try:
        mx_ticks += sum(stat(p)[1][0:2])
    except (OSError, IndexError, ValueError):
        pass
    todo.extend(children.get(p, []))
_, (mm_user, mm_sys, _, _) = stat(mm)
print(run_time_us(mm), mm_user, mm_sys, mx_ticks, run_time_us(unbound))
EOF
procstat() { "$PYTHON" "$WORK/procstat.py" "$MM_PID" "$MX_MASTER" "$UNBOUND"; }

# The messages in mx1's Maildir.
delivered() { find "$MAILDIR/new" "$MAILDIR/cur" -type f | wc -l; }
clear_maildir() { find "$MAILDIR/new" "$MAILDIR/cur" "$MAILDIR/tmp" -type f -delete; }

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
FAILED=0

# stdin as one line of at most 300 characters without quotes or backslashes (for JSON).
one_line() { tr '\n\t\r' '   ' | sed 's/["\\]/ /g' | cut -c1-300; }

# run SCENARIO SIDE REP COUNT SIZE SESSIONS: one smtp-source run on the load core, its
# figures appended to RESULTS as a JSON line.
run() {
    local scenario=$1 side=$2 rep=$3 count=$4 size=$5 sessions=$6
    local addr rcpt rc=0 t0 t1 before after got over_tls=-1 log_lines problems limit deadline
    case "$side" in
        direct) addr=$LAB_MX1:25 ;;
        *) addr=127.0.0.1:$RELAY_PORT ;;
    esac
    rcpt=bench-$side@${DOMAIN[$side]}
    clear_maildir
    [ "$(delivered)" = 0 ] || die "mx1's Maildir is not empty"
    log_lines=$(wc -l <"$WORK/mailmoat.log")
    # The peak resident set from here on (Linux >= 4.0).
    echo 5 >"/proc/$MM_PID/clear_refs"
    before=$(procstat)
    # Generous: a 1 MB message can take a second or more on a loaded machine.
    limit=$((60 + count * (size >= LARGE ? 4 : 1)))
    t0=$EPOCHREALTIME
    timeout -k 5 "$limit" taskset -c "$LOAD_CPU" "$SMTP_SOURCE" -s "$sessions" -m "$count" \
        -l "$size" -M bench.legacy.example -f bench@legacy.example -t "$rcpt" \
        -S "bench $scenario $side $rep" "$addr" >"$WORK/smtp-source.out" 2>&1 || rc=$?
    t1=$EPOCHREALTIME
    # Bounded: the MX delivers into the Maildir after its reply.
    deadline=$((SECONDS + 60))
    while [ "$(delivered)" -lt "$count" ] && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    # Anything more arriving late would be a duplicate.
    sleep 0.3
    got=$(delivered)
    after=$(procstat)
    if [ "$side" != direct ]; then
        over_tls=$(grep -lrF -e '(using TLSv1.3' "$MAILDIR/new" "$MAILDIR/cur" | wc -l)
    fi
    problems=$(tail -n +"$((log_lines + 1))" "$WORK/mailmoat.log" | wc -l)
    local hwm
    hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$MM_PID/status")
    local why=()
    [ "$rc" = 0 ] || why+=("smtp-source exit $rc: $(tail -n 3 "$WORK/smtp-source.out" | one_line)")
    [ "$got" = "$count" ] || why+=("$got of $count messages arrived")
    [ "$side" = direct ] || [ "$over_tls" = "$got" ] || why+=("$over_tls of $got arrived over TLS 1.3")
    [ "$problems" = 0 ] || why+=("mailmoat logged $problems lines: $(tail -n 1 "$WORK/mailmoat.log" | one_line)")
    if [ "${#why[@]}" -gt 0 ]; then
        FAILED=$((FAILED + 1))
        log "$scenario/$side rep $rep FAILED: ${why[*]}"
        cp "$WORK/smtp-source.out" "$WORK/smtp-source.$scenario.$side.$rep.out"
    fi
    local IFS=' '
    # shellcheck disable=SC2086 # before/after: five numbers each
    set -- $before $after
    printf '{"scenario":"%s","side":"%s","rep":%s,"messages":%s,"size":%s,"sessions":%s,' \
        "$scenario" "$side" "$rep" "$count" "$size" "$sessions"
    printf '"elapsed_s":%s,"delivered":%s,"over_tls":%s,"log_lines":%s,"smtp_source_exit":%s,' \
        "$("$PYTHON" -c "print($t1 - $t0)")" "$got" "$over_tls" "$problems" "$rc"
    printf '"mm_cpu_us":%s,"mm_user_ticks":%s,"mm_sys_ticks":%s,"mx_cpu_us":%s,' \
        "$(($6 - $1))" "$(($7 - $2))" "$(($8 - $3))" "$(((${9} - $4) * 10000))"
    printf '"resolver_cpu_us":%s,"mm_hwm_kib":%s,"errors":"%s"}\n' \
        "$((${10} - $5))" "${hwm:-0}" "${why[*]:-}"
}

# scenario NAME COUNT SIZE SESSIONS: REPS repetitions of the three sides, the order
# reversed every other repetition, one run at a time.
scenario() {
    local name=$1 rep i order
    log "scenario $name: $2 messages of $3 bytes, $4 at once, $REPS repetitions"
    for rep in $(seq 1 "$REPS"); do
        order=("${SIDES[@]}")
        [ $((rep % 2)) = 1 ] || order=("${SIDES[2]}" "${SIDES[1]}" "${SIDES[0]}")
        for i in "${order[@]}"; do
            run "$name" "$i" "$rep" "$2" "$3" "$4" >>"$RESULTS"
        done
    done
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STAT_START=$(head -n 1 /proc/stat)
STARTED=$SECONDS
# Warm-up, not counted: unbound's cache and mailmoat's first handshakes.
for side in "${SIDES[@]}"; do
    run warmup "$side" 0 4 "$SMALL" 2 >"$WORK/warmup.jsonl"
done
[ "$FAILED" = 0 ] || die "the warm-up failed: see $WORK (--keep keeps it)"
for s in "${SESSIONS[@]}"; do
    scenario "10kB_s$s" "$N_SMALL" "$SMALL" "$s"
done
for s in "${SESSIONS[@]}"; do
    scenario "1MB_s$s" "$N_LARGE" "$LARGE" "$s"
done
ELAPSED=$((SECONDS - STARTED))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
STAT_END=$(head -n 1 /proc/stat)
clear_maildir

# ------------------------------------------------------------------ table
"$PYTHON" - "$RESULTS" "$REPS" "$ELAPSED" "$CORES" "$LOAD_START" "$LOAD_END" "$STAT_START" \
    "$STAT_END" "$THREADS" "$UNIT_TUNABLES" "bash scripts/bench-outbound.sh${ARGS:+ $ARGS}" <<'EOF'
import json, statistics, sys
(path, reps, elapsed, cores, load_start, load_end, stat_start, stat_end, threads, tunables,
 command) = sys.argv[1:12]
runs = {}
errors = []
for line in open(path):
    r = json.loads(line)
    runs.setdefault((r["scenario"], r["side"]), []).append(r)
    if r["errors"]:
        errors.append(f'{r["scenario"]}/{r["side"]} rep {r["rep"]}: {r["errors"]}')
scenarios = list(dict.fromkeys(sc for sc, _ in runs))

def msgs_per_s(r): return r["messages"] / r["elapsed_s"]
def per_msg(key): return lambda r: r[key] / r["messages"]
def values(sc, side, f):
    return [f(r) for r in runs.get((sc, side), [])]
def med(sc, side, f):
    v = values(sc, side, f)
    return statistics.median(v) if v else None
def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"

print()
print(f"mailmoat outbound relay benchmark: medians of {reps} repetitions, the three sides "
      f"alternating; mailmoat on core 0 ({threads} threads), the lab and smtp-source on "
      f"core 1 ({cores} cores); {elapsed} s")
busy = lambda l: (lambda v: (sum(v) - v[3] - v[4], sum(v)))([int(x) for x in l.split()[1:9]])
(b0, t0), (b1, t1) = busy(stat_start), busy(stat_end)
print(f"machine load: load average {load_start} at the start, {load_end} at the end; all "
      f"cores {100 * (b1 - b0) / max(t1 - t0, 1):.0f}% busy during the runs (this benchmark "
      f"included)")
print(f"mailmoat: log level warn, GLIBC_TUNABLES={tunables} (as config/mailmoat.service sets it)")
print("one message per SMTP session; mailmoat opens one MX connection per transaction (no "
      "connection reuse yet): each message through it costs DNS lookups, a TCP connection "
      "and a TLS 1.3 handshake with the MX")
print()
print("| scenario | metric | direct | through mailmoat, dane.test | ratio | "
      "through mailmoat, plain.test | ratio |")
print("|---|---|---:|---:|---:|---:|---:|")
def row(sc, metric, f, digits=1, direct=True, compare=True):
    d = med(sc, "direct", f) if direct else None
    a, p = med(sc, "dane", f), med(sc, "plain", f)
    cells = [sc, metric, fmt(d, digits), fmt(a, digits),
             ratio(a, d) if compare else "-", fmt(p, digits), ratio(p, d) if compare else "-"]
    print("| " + " | ".join(cells) + " |")
for sc in scenarios:
    row(sc, "messages/s", msgs_per_s)
    row(sc, "mailmoat CPU µs/message", per_msg("mm_cpu_us"), 0, direct=False)
    row(sc, "of which kernel µs/message", lambda r: r["mm_sys_ticks"] * 1e4 / r["messages"], 0,
        direct=False)
    row(sc, "mailmoat peak RSS MiB", lambda r: r["mm_hwm_kib"] / 1024, 1, direct=False)
    row(sc, "MX Postfix CPU µs/message", per_msg("mx_cpu_us"), 0)
    row(sc, "resolver (unbound) CPU µs/message", per_msg("resolver_cpu_us"), 0, direct=False)
    total = lambda side, key: sum(r[key] for r in runs.get((sc, side), []))
    cells = [sc, "delivered / sent, all repetitions"]
    for side in ("direct", "dane", "plain"):
        cells.append(f'{total(side, "delivered"):,} / {total(side, "messages"):,}')
        if side != "direct":
            cells.append("-")
    print("| " + " | ".join(cells) + " |")

print("\nper repetition (the spread the medians hide):")
for sc in scenarios:
    for side in ("direct", "dane", "plain"):
        rs = sorted(runs.get((sc, side), []), key=lambda r: r["rep"])
        if not rs:
            continue
        m = [msgs_per_s(r) for r in rs]
        line = f"- {sc}, {side}: messages/s " + ", ".join(f"{v:,.1f}" for v in m)
        if side != "direct":
            c = [r["mm_cpu_us"] / r["messages"] for r in rs]
            line += "; mailmoat CPU µs/message " + ", ".join(f"{v:,.0f}" for v in c)
        print(line)
print("\nCPU: mailmoat's is the run time of its threads (/proc/PID/task/*/schedstat) over "
      "the run, its kernel share and the MX's (the whole Postfix instance: smtpd, cleanup, "
      "qmgr, virtual delivery into the Maildir, tlsmgr) from /proc/PID/stat's 10 ms ticks; "
      "unbound's from its threads' run time. Ratios: through mailmoat / direct.")
print(f"\ncommand: {command}")
if errors:
    print(f"\nRUNS WITH ERRORS ({len(errors)}):")
    for e in errors:
        print(f"- {e}")
    sys.exit(1)
print("\nall runs: every message accepted and delivered, each through mailmoat over TLS 1.3; "
      "0 errors")
EOF
