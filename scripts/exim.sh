#!/usr/bin/env bash
# A private, plaintext-only ("legacy") Exim 4.96 on 127.0.0.1, for mailmoat's
# end-to-end tests: Debian's exim4-daemon-light, unpacked (never installed: it conflicts
# with the Postfix the other tests use) by scripts/install-deps.sh. Everything the
# instance writes lives under DIR, so several instances (different DIRs and ports) can
# run side by side.
#
#   exim.sh start DIR [--helo-only] [--watch PID]   (re)start, write DIR/exim.env
#   exim.sh stop DIR                                 stop it (tolerates already stopped)
#
# Port: EXIM_SMTP_PORT (2526). The unpacked package: MAILMOAT_EXIM_ROOT (default
# target/exim/root of this checkout, where install-deps.sh puts it).
#
# What the instance is, on purpose, as a naive legacy server would be:
# - no TLS at all, and AUTH PLAIN offered and accepted in plaintext
#   (alice@example.test / alice-secret-pw);
# - PIPELINING and CHUNKING (BDAT) advertised; Exim's own strict synchronisation checks
#   as shipped;
# - mail for any local part of example.test is accepted from anyone and delivered into
#   one Maildir, DIR/mail/Maildir (Envelope-to: names the recipient); authenticated
#   clients may relay, but nothing ever leaves (no router for other domains);
# - logs: DIR/log/mainlog (log_selector = +all) and DIR/log/commands.log, Exim's debug
#   output for receiving (-d-all+receive): one "PID SMTP<< LINE" for every line Exim read
#   as an SMTP command, which is how a test proves what Exim took for a command.
# --helo-only: EHLO is refused with "500 5.5.1 Command unrecognized: EHLO" (acl_smtp_helo
# on $smtp_command); HELO works, and nothing is advertised.
#
# Exim as root: the daemon runs as root with -C (a root caller keeps its privilege), and
# drops to the Exim user (Debian-exim, created by install-deps.sh) for each connection.
# Deliveries are re-executions of the binary with -C, which do lose root, so they run as
# the Exim user too (deliver_drop_privilege) and the Maildir is that user's.
set -euo pipefail

PROG=$(basename "$0")
SELF=$(readlink -f "$0")
REPO=$(dirname "$(dirname "$SELF")")
# die, note, the directory, ports, /proc and the watcher's wait, as legacy.sh has them.
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$SELF")/lib/instance.sh"

usage() {
    cat >&2 <<EOF
usage: $PROG start DIR [--helo-only] [--watch PID]
       $PROG stop DIR
env:   EXIM_SMTP_PORT (2526)
       MAILMOAT_EXIM_ROOT (the unpacked exim4-daemon-light; default $REPO/target/exim/root)
EOF
    exit 2
}

EXIM_VERSION=4.96
EXIM_USER=Debian-exim
# Exim's daemon notifier socket is named after the spool directory (108 bytes).
MAX_DIR_LEN=70

set_paths() {
    # The path goes unquoted into exim.conf and exim.env.
    set_dir "$1"
    CONF=$DIR/exim.conf
    SPOOL=$DIR/spool
    LOG_DIR=$DIR/log
    MAINLOG=$LOG_DIR/mainlog
    COMMAND_LOG=$LOG_DIR/commands.log
    MAIL_DIR=$DIR/mail
    MAILDIR=$MAIL_DIR/Maildir
    RUN_DIR=$DIR/run
    PID_FILE=$RUN_DIR/exim.pid
    WATCH_PID_FILE=$RUN_DIR/watch.pid
    ENV_FILE=$DIR/exim.env
}

# ---------------------------------------------------------------- processes

# Every live process of this instance: each Exim process (the daemon, a connection's
# child, a delivery re-executed with -C) names this instance's config file.
instance_pids() {
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" != $$ ] || continue
        proc_has "$p" cmdline "$CONF" && proc_running "$p" && echo "$p"
    done
    return 0
}

# ---------------------------------------------------------------- stop

kill_watcher() {
    local pid
    pid=$(head -n1 "$WATCH_PID_FILE" 2>/dev/null | tr -dc '0-9') || true
    if [ -n "$pid" ] && proc_running "$pid" && proc_has "$pid" cmdline __watch &&
        proc_has "$pid" cmdline "$DIR" && [ "$pid" != "${EXIM_WATCHER_PID:-}" ]; then
        kill "$pid" 2>/dev/null || true
    fi
    rm -f "$WATCH_PID_FILE"
}

do_stop() {
    local pids p
    kill_watcher
    pids=($(instance_pids))
    [ "${#pids[@]}" -gt 0 ] || { rm -f "$PID_FILE"; return 0; }
    # SIGTERM makes the daemon close its socket and exit. A session's process in the
    # middle of a message ignores it; a test instance's unfinished message is not worth
    # waiting for, so after a second whatever is left gets SIGKILL (Maildir delivery
    # writes into tmp/ and renames, so no half-written message ever appears in new/).
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait_gone 10 "${pids[@]}" || true
    # A child forked meanwhile names the config file too.
    pids+=($(instance_pids))
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait_gone 50 "${pids[@]}" || die "processes of $DIR still running after SIGKILL: ${pids[*]}"
    rm -f "$PID_FILE"
}

# ---------------------------------------------------------------- config

write_config() {
    local helo_acl=
    if [ "$HELO_ONLY" = 1 ]; then
        helo_acl='  deny condition = ${if match{$smtp_command}{\N^(?i)ehlo\b\N}}
       message = 500 5.5.1 Command unrecognized: EHLO'
    fi
    cat >"$CONF" <<EOF
# Generated by scripts/exim.sh - plaintext legacy Exim for mailmoat's tests.
exim_path = $EXIM_BIN
exim_user = $EXIM_USER
exim_group = $EXIM_USER
never_users = root
deliver_drop_privilege = true
keep_environment =

primary_hostname = legacy-exim.example.test
qualify_domain = example.test
domainlist local_domains = example.test
spool_directory = $SPOOL
log_file_path = $LOG_DIR/%slog
log_selector = +all
local_interfaces = 127.0.0.1

# No DNS, no ident: the loopback link only.
host_lookup =
rfc1413_hosts =

# A naive legacy server: AUTH in plaintext, PIPELINING and CHUNKING, no TLS.
tls_advertise_hosts =
auth_advertise_hosts = *
pipelining_advertise_hosts = *
pipelining_connect_advertise_hosts =
chunking_advertise_hosts = *
message_size_limit = 50M
smtp_accept_max = 200
queue_only = false

acl_smtp_helo = acl_helo
acl_smtp_rcpt = acl_rcpt

begin acl

acl_helo:
$helo_acl
  accept

acl_rcpt:
  accept domains = +local_domains
  accept authenticated = *
  deny message = relay not permitted

begin routers

local:
  driver = accept
  domains = +local_domains
  transport = maildir

begin transports

maildir:
  driver = appendfile
  directory = $MAILDIR
  maildir_format
  create_directory
  mode = 0644
  envelope_to_add
  return_path_add

begin authenticators

plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = \${if and {{eq{\$auth2}{alice@example.test}}{eq{\$auth3}{alice-secret-pw}}}}
  server_set_id = \$auth2
  server_advertise_condition = true
EOF
    # Exim refuses a config file others may write; deliveries (as the Exim user) read it.
    chmod 0644 "$CONF"
}

# ---------------------------------------------------------------- start

print_logs() {
    print_tails 40 "$LOG_DIR/control.log" "$MAINLOG" "$LOG_DIR/paniclog"
}

check_exim() {
    [ -x "$EXIM_BIN" ] ||
        die "no Exim at $EXIM_BIN: run scripts/install-deps.sh as root (it unpacks Debian's exim4-daemon-light $EXIM_VERSION there), or set MAILMOAT_EXIM_ROOT"
    id -u "$EXIM_USER" >/dev/null 2>&1 ||
        die "no user $EXIM_USER, which Debian's Exim binary needs before it reads any config: run scripts/install-deps.sh as root"
    local missing version
    missing=$(ldd "$EXIM_BIN" 2>&1 | sed -n 's/^[[:space:]]*\([^ ]*\) => not found.*/\1/p' | tr '\n' ' ')
    [ -z "$missing" ] || die "$EXIM_BIN lacks libraries: $missing(run scripts/install-deps.sh as root)"
    version=$("$EXIM_BIN" -C /dev/null -bV 2>/dev/null </dev/null | sed -n 's/^Exim version \([^ ]*\) .*/\1/p')
    [ "$version" = "$EXIM_VERSION" ] ||
        die "$EXIM_BIN reports version '${version:-none}', not $EXIM_VERSION"
}

do_start() {
    local watch_pid=$1
    check_exim
    if [ -d "$DIR" ]; then
        do_stop
    fi
    port_in_use "$PORT" && die "port 127.0.0.1:$PORT is already in use (set EXIM_SMTP_PORT)"

    mkdir -p "$DIR" "$SPOOL" "$LOG_DIR" "$MAIL_DIR" "$RUN_DIR"
    rm -f "$ENV_FILE"
    # The Exim user must reach DIR.
    chmod 0755 "$DIR"
    open_ancestors "the Exim user"
    chown "$EXIM_USER:$EXIM_USER" "$SPOOL" "$LOG_DIR" "$MAIL_DIR"
    write_config
    : >"$COMMAND_LOG"
    echo "---- start $(date -Is)" >>"$LOG_DIR/control.log"

    # Foreground daemon (-bdf) in a session of its own; its debug output (the commands
    # it reads) goes to the command log. -oX: the port; -oP: a pid file even so.
    setsid "$EXIM_BIN" -C "$CONF" -bdf -oX "$PORT" -oP "$PID_FILE" -d-all+receive \
        </dev/null >>"$COMMAND_LOG" 2>&1 &
    local exim_pid=$!

    local deadline=$((SECONDS + 20))
    until banner_ok "$PORT" "220 "; do
        if ! proc_running "$exim_pid"; then
            note "exim exited at start"
            print_logs
            do_stop
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            note "timed out waiting for Exim's banner on port $PORT"
            print_logs
            do_stop
            exit 1
        fi
        sleep 0.1
    done

    cat >"$ENV_FILE.tmp" <<EOF
EXIM_SMTP_PORT=$PORT
EXIM_PID=$exim_pid
EXIM_MAINLOG=$MAINLOG
EXIM_COMMAND_LOG=$COMMAND_LOG
EXIM_MAILDIR=$MAILDIR
EXIM_HELO_ONLY=$HELO_ONLY
EOF
    mv "$ENV_FILE.tmp" "$ENV_FILE"

    if [ -n "$watch_pid" ]; then
        start_watcher "$watch_pid" || { note "the watcher did not start"; do_stop; exit 1; }
    fi
    note "exim $EXIM_VERSION up in $DIR (smtp 127.0.0.1:$PORT$([ "$HELO_ONLY" = 1 ] && echo ', HELO only'))"
}

# Background watcher: stop the instance once PID has exited.
do_watch() {
    watch_until_gone "$1" "$2"
    EXIM_WATCHER_PID=$$ do_stop
    echo "$(date -Is) stopped"
}

# ---------------------------------------------------------------- main

[ "$(id -u)" -eq 0 ] || die "must run as root (Exim's daemon starts as root and drops to $EXIM_USER)"
[ $# -ge 2 ] || usage

PORT=${EXIM_SMTP_PORT:-2526}
case "$PORT" in '' | *[!0-9]*) die "EXIM_SMTP_PORT must be a port number: $PORT" ;; esac
EXIM_ROOT=${MAILMOAT_EXIM_ROOT:-$REPO/target/exim/root}
EXIM_BIN=$EXIM_ROOT/usr/sbin/exim4
HELO_ONLY=0

cmd=$1
set_paths "$2"
shift 2

case "$cmd" in
    start)
        watch=
        while [ $# -gt 0 ]; do
            case "$1" in
                --helo-only) HELO_ONLY=1; shift ;;
                --watch)
                    [ $# -ge 2 ] || usage
                    case "$2" in '' | *[!0-9]*) die "--watch needs a numeric PID" ;; esac
                    watch=$2
                    shift 2
                    ;;
                *) usage ;;
            esac
        done
        do_start "$watch"
        ;;
    stop)
        [ $# -eq 0 ] || usage
        [ -d "$DIR" ] || exit 0
        do_stop
        ;;
    __watch)
        [ $# -eq 2 ] || usage
        do_watch "$1" "$2"
        ;;
    *)
        usage
        ;;
esac
