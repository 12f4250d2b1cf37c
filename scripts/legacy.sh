#!/usr/bin/env bash
# Private, plaintext-only ("legacy") Postfix + Dovecot instance on 127.0.0.1 for
# mailmoat's end-to-end tests and demo. Everything lives under DIR, so several
# instances (different DIRs and ports) can run side by side.
#
#   legacy.sh start DIR [--watch PID]   (re)start the instance, write DIR/legacy.env
#   legacy.sh stop DIR                  stop it (tolerates already stopped)
#
# Ports: LEGACY_SMTP_PORT (2525), LEGACY_IMAP_PORT (1143), LEGACY_POP3_PORT (1110).
# Extra settings: LEGACY_POSTFIX_EXTRA ("name = value" lines set in main.cf with
# postconf -e, replacing the default), LEGACY_POSTFIX_MASTER_EXTRA
# (appended to master.cf: more smtpd services, e.g. one with PROXY protocol on, so the
# banner check on the main port still works), LEGACY_DOVECOT_EXTRA (appended to
# dovecot.conf; later settings override earlier ones).
# Users: alice@example.test / alice-secret-pw, bob@example.test / bob-secret-pw.
set -euo pipefail

PROG=$(basename "$0")
SELF=$(readlink -f "$0")
# die, note, the directory, ports, /proc and the watcher's wait, as exim.sh has them.
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$SELF")/lib/instance.sh"

usage() {
    cat >&2 <<EOF
usage: $PROG start DIR [--watch PID]
       $PROG stop DIR
env:   LEGACY_SMTP_PORT (2525) LEGACY_IMAP_PORT (1143) LEGACY_POP3_PORT (1110)
       LEGACY_POSTFIX_EXTRA ("name = value" lines set in main.cf)
       LEGACY_POSTFIX_MASTER_EXTRA (lines appended to master.cf)
       LEGACY_DOVECOT_EXTRA (lines appended to dovecot.conf)
EOF
    exit 2
}

# ---------------------------------------------------------------- helpers

# Unix socket paths are limited to 107 bytes; the deepest socket is Dovecot's
# DIR/run/dovecot/token-login/imap-urlauth (DIR + 37), Postfix's are shorter.
MAX_DIR_LEN=70

set_paths() {
    # The path goes unquoted into main.cf, dovecot.conf and legacy.env.
    set_dir "$1" "unix socket path limit"
    PF_CONF=$DIR/postfix
    PF_QUEUE=$DIR/spool
    PF_DATA=$DIR/data
    DC_CONF_DIR=$DIR/dovecot
    DC_CONF=$DC_CONF_DIR/dovecot.conf
    DC_BASE=$DIR/run/dovecot
    AUTH_SOCK=$DIR/run/auth-postfix
    LOG_DIR=$DIR/log
    PF_LOG=$LOG_DIR/postfix.log
    DC_LOG=$LOG_DIR/dovecot.log
    MAIL_DIR=$DIR/mail
    WATCH_PID_FILE=$DIR/run/watch.pid
    ENV_FILE=$DIR/legacy.env
}

# live_pid and descendants come from lib/instance.sh.

# ---------------------------------------------------------------- stop

kill_watcher() {
    local pid
    pid=$(live_pid "$WATCH_PID_FILE") || { rm -f "$WATCH_PID_FILE"; return 0; }
    proc_has "$pid" cmdline "__watch" || { rm -f "$WATCH_PID_FILE"; return 0; }
    # The watcher runs "stop" itself; it must not kill itself half way.
    if [ "$pid" != "${LEGACY_WATCHER_PID:-}" ]; then
        kill "$pid" 2>/dev/null || true
    fi
    rm -f "$WATCH_PID_FILE"
}

do_stop() {
    local pf_pid dc_pid pids=() p i
    kill_watcher

    # Remember every process of the instance before asking it to stop, so we can
    # SIGKILL stragglers afterwards and guarantee nothing is left behind.
    pf_pid=$(live_pid "$PF_QUEUE/pid/master.pid" || true)
    dc_pid=$(live_pid "$DC_BASE/master.pid" || true)
    # A stale pid file (e.g. after a container restart) may name an unrelated
    # process now: only act on processes that really belong to this DIR.
    proc_has "$pf_pid" environ "MAIL_CONFIG=$PF_CONF" || pf_pid=
    proc_has "$dc_pid" cmdline "$DC_CONF" || dc_pid=
    for p in $pf_pid $dc_pid; do
        pids+=("$p")
        for i in $(descendants "$p"); do pids+=("$i"); done
    done

    if [ -n "$pf_pid" ]; then
        # Bounded: "postfix stop" blocks for good if Postfix's logging is stuck.
        timeout -k 2 10 postfix -c "$PF_CONF" stop </dev/null >>"$LOG_DIR/control.log" 2>&1 ||
            timeout -k 2 5 postfix -c "$PF_CONF" abort </dev/null >>"$LOG_DIR/control.log" 2>&1 || true
    fi
    if [ -n "$dc_pid" ]; then
        # SIGTERM to the master is what "doveadm stop" does, minus its ~3 s wait;
        # we wait below, in parallel with Postfix.
        kill -TERM "$dc_pid" 2>/dev/null || true
    fi

    # Wait up to 10 s for a clean exit, then kill what is left.
    wait_gone 100 "${pids[@]}" || true
    for p in "${pids[@]}"; do
        kill -9 "$p" 2>/dev/null || true
    done
    # Postfix programs of this instance that are no master's descendants: "master -t"
    # (run by postfix-script) starts a session of its own and would outlive a stuck
    # "postfix stop", and so would a postlog blocked on the log socket. Only Postfix's
    # own binaries: anything else a caller started may carry the same MAIL_CONFIG.
    local bin_dirs exe d swept=()
    bin_dirs=$(postconf -c "$PF_CONF" -h daemon_directory command_directory 2>/dev/null) ||
        bin_dirs="/usr/lib/postfix/sbin /usr/sbin"
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        proc_has "$p" environ "MAIL_CONFIG=$PF_CONF" || continue
        exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
        for d in $bin_dirs; do
            if [ "$(dirname "$exe")" = "$d" ]; then
                kill -9 "$p" 2>/dev/null || true
                swept+=("$p")
            fi
        done
    done
    # SIGKILL lands asynchronously: wait (bounded) until every one is gone.
    wait_gone 50 "${pids[@]}" "${swept[@]}" || true
    rm -f "$AUTH_SOCK"
}

# ---------------------------------------------------------------- config

write_configs() {
    local mail_uid mail_gid
    # Existing system user for the virtual mailboxes; Postfix's virtual(8) and
    # Dovecot both need explicit minimum-uid settings because uid 8 is "low".
    mail_uid=$(id -u mail) || die "no 'mail' user"
    mail_gid=$(id -g mail)
    MAIL_UID=$mail_uid

    # data_directory and the queue subdirs are created (owned by postfix) by
    # "postfix start" itself (post-install create-missing).
    mkdir -p "$PF_CONF" "$PF_QUEUE" "$DC_CONF_DIR/state" "$DIR/run" "$LOG_DIR"
    # Postfix (user postfix), Dovecot login/auth (dovenull/dovecot) and the mail
    # uid all need to traverse DIR.
    chmod 0755 "$DIR" "$DIR/run" "$LOG_DIR" "$DC_CONF_DIR"
    chown root:root "$PF_QUEUE" && chmod 0755 "$PF_QUEUE"

    # Maildirs in the layout Postfix virtual(8) delivers to (virtual_mailbox_base/<map value>).
    local u
    for u in alice bob; do
        mkdir -p "$MAIL_DIR/example.test/$u/Maildir/"{cur,new,tmp}
    done
    chown -R "$mail_uid:$mail_gid" "$MAIL_DIR"
    chmod 0755 "$MAIL_DIR"

    # ---- Dovecot (2.3 setting names)
    cat >"$DC_CONF_DIR/users" <<EOF
alice@example.test:{PLAIN}alice-secret-pw:$mail_uid:$mail_gid::$MAIL_DIR/example.test/alice::
bob@example.test:{PLAIN}bob-secret-pw:$mail_uid:$mail_gid::$MAIL_DIR/example.test/bob::
EOF
    # The auth process runs as "dovecot" and reads this itself.
    chown root:dovecot "$DC_CONF_DIR/users"
    chmod 0640 "$DC_CONF_DIR/users"

    cat >"$DC_CONF" <<EOF
# Generated by scripts/legacy.sh - plaintext legacy IMAP/POP3 for tests.
instance_name = legacy-$IMAP_PORT
base_dir = $DC_BASE
state_dir = $DC_CONF_DIR/state
protocols = imap pop3
listen = 127.0.0.1

ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
log_path = $DC_LOG
info_log_path = $DC_LOG

first_valid_uid = $mail_uid
first_valid_gid = $mail_gid
mail_location = maildir:~/Maildir
mail_plugins = \$mail_plugins zlib

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $DC_CONF_DIR/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $DC_CONF_DIR/users
}

protocol imap {
  mail_plugins = \$mail_plugins imap_zlib
}

service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $IMAP_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $POP3_PORT
  }
  inet_listener pop3s {
    port = 0
  }
}
# Not needed; keep them from listening anywhere.
service submission-login {
  inet_listener submission {
    port = 0
  }
}
service lmtp {
  unix_listener lmtp {
    mode = 0600
  }
}
# SASL for Postfix smtpd (test instance, so world-connectable is fine).
service auth {
  unix_listener $AUTH_SOCK {
    mode = 0666
  }
}
EOF
    if [ -n "${LEGACY_DOVECOT_EXTRA:-}" ]; then
        printf '# LEGACY_DOVECOT_EXTRA\n%s\n' "$LEGACY_DOVECOT_EXTRA" >>"$DC_CONF"
    fi

    # ---- Postfix
    cat >"$PF_CONF/vmailbox" <<EOF
alice@example.test example.test/alice/Maildir/
bob@example.test   example.test/bob/Maildir/
EOF

    cat >"$PF_CONF/main.cf" <<EOF
# Generated by scripts/legacy.sh - plaintext legacy SMTP for tests.
compatibility_level = 3.6
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
# No syslog in the sandbox: log through postlogd (see master.cf) to a file.
maillog_file = $PF_LOG
maillog_file_prefixes = $LOG_DIR

myhostname = legacy.example.test
mydomain = example.test
myorigin = \$myhostname
mydestination =
smtpd_banner = \$myhostname ESMTP legacy
biff = no
append_dot_mydomain = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Not loopback: the proxy connects from 127.0.0.1 and must not get open relay.
mynetworks = 192.0.2.1/32
smtpd_peername_lookup = no
# Behind a proxy every client is 127.0.0.1: per-client connection and rate limits
# (anvil) would count all clients together, so the proxy's address is exempt.
smtpd_client_event_limit_exceptions = 127.0.0.0/8

smtpd_tls_security_level = none
smtp_tls_security_level = none
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = $AUTH_SOCK
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination

virtual_mailbox_domains = example.test
virtual_mailbox_base = $MAIL_DIR
virtual_mailbox_maps = texthash:$PF_CONF/vmailbox
virtual_minimum_uid = $mail_uid
virtual_uid_maps = static:$mail_uid
virtual_gid_maps = static:$mail_gid
virtual_mailbox_limit = 0
mailbox_size_limit = 0
message_size_limit = 52428800

# Nothing ever leaves this instance: mail to foreign domains (authenticated relay)
# bounces immediately instead of sitting in the queue doing DNS lookups.
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:local delivery disabled in legacy test instance
default_transport = error:outbound mail disabled in legacy test instance
relay_transport = error:outbound mail disabled in legacy test instance
EOF
    # Test-specific settings (e.g. an open-relay mynetworks, PROXY protocol, XCLIENT).
    # Set in place, never appended: a repeated name makes every Postfix process warn
    # "overriding earlier entry" as it starts, which can deadlock the instance (see
    # refuse_postfix_warnings).
    local setting
    while IFS= read -r setting; do
        case "$setting" in '' | '#'*) continue ;; esac
        case "$setting" in
            [A-Za-z]*=*) ;;
            *) die "LEGACY_POSTFIX_EXTRA: not a \"name = value\" line: $setting" ;;
        esac
        postconf -c "$PF_CONF" -e "$setting" </dev/null >>"$LOG_DIR/control.log" 2>&1 ||
            die "LEGACY_POSTFIX_EXTRA: postconf refused: $setting"
    done <<<"${LEGACY_POSTFIX_EXTRA:-}"

    # chroot column is "n" everywhere: the queue lives under DIR, not /var/spool.
    cat >"$PF_CONF/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$SMTP_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    if [ -n "${LEGACY_POSTFIX_MASTER_EXTRA:-}" ]; then
        printf '# LEGACY_POSTFIX_MASTER_EXTRA\n%s\n' "$LEGACY_POSTFIX_MASTER_EXTRA" >>"$PF_CONF/master.cf"
    fi
}

# Postfix daemons log through postlogd's datagram socket with blocking sends, and
# postlogd itself logs to that socket while it starts. A config that makes every
# process warn at start-up (a repeated setting, say) fills the socket's queue
# (net.unix.max_dgram_qlen, 10 by default) before postlogd drains it: postlogd
# blocks on its own socket, and with it every Postfix process that logs, "postfix
# stop" included. So a warning is refused here, with Postfix's own words.
refuse_postfix_warnings() {
    local warnings
    warnings=$(postconf -c "$PF_CONF" -n 2>&1 >/dev/null </dev/null) ||
        die "postconf cannot read $PF_CONF/main.cf: $warnings"
    [ -z "$warnings" ] ||
        die "refusing $PF_CONF/main.cf, which Postfix warns about (a warning every daemon logs as it starts can deadlock its logging): $warnings"
}

# ---------------------------------------------------------------- start

print_logs() {
    print_tails 60 "$LOG_DIR/control.log" "$PF_LOG" "$DC_LOG"
}

do_start() {
    local watch_pid=$1

    # Fresh start: stop whatever this DIR was running before.
    if [ -d "$DIR" ]; then
        do_stop
    fi
    mkdir -p "$DIR"
    mkdir -p "$LOG_DIR"
    rm -f "$ENV_FILE"

    # Daemons run as postfix/dovecot/dovenull/mail. DIR itself is chmod 0755 in
    # write_configs.
    open_ancestors "mail daemons"

    local p
    for p in "$SMTP_PORT" "$IMAP_PORT" "$POP3_PORT"; do
        if port_in_use "$p"; then
            die "port 127.0.0.1:$p is already in use (another instance? set LEGACY_*_PORT)"
        fi
    done

    write_configs
    refuse_postfix_warnings
    : >>"$PF_LOG"
    : >>"$DC_LOG"
    echo "---- start $(date -Is)" >>"$LOG_DIR/control.log"

    # Stdio to a file: the daemons must not keep a caller's capture pipe open.
    if ! dovecot -c "$DC_CONF" </dev/null >>"$LOG_DIR/control.log" 2>&1; then
        note "dovecot failed to start"
        print_logs
        exit 1
    fi
    if ! postfix -c "$PF_CONF" start </dev/null >>"$LOG_DIR/control.log" 2>&1; then
        note "postfix failed to start"
        print_logs
        do_stop
        exit 1
    fi

    # Wait for all three banners.
    local deadline=$((SECONDS + 30)) ok
    while :; do
        ok=1
        banner_ok "$SMTP_PORT" "220 " || ok=0
        [ "$ok" = 1 ] && { banner_ok "$IMAP_PORT" "* OK" || ok=0; }
        [ "$ok" = 1 ] && { banner_ok "$POP3_PORT" "+OK" || ok=0; }
        [ "$ok" = 1 ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            note "timed out waiting for banners on ports $SMTP_PORT/$IMAP_PORT/$POP3_PORT"
            print_logs
            do_stop
            exit 1
        fi
        sleep 0.2
    done

    cat >"$ENV_FILE.tmp" <<EOF
LEGACY_SMTP_PORT=$SMTP_PORT
LEGACY_IMAP_PORT=$IMAP_PORT
LEGACY_POP3_PORT=$POP3_PORT
LEGACY_POSTFIX_LOG=$PF_LOG
LEGACY_DOVECOT_LOG=$DC_LOG
LEGACY_MAILDIR_ALICE=$MAIL_DIR/example.test/alice/Maildir
LEGACY_MAILDIR_BOB=$MAIL_DIR/example.test/bob/Maildir
EOF
    # Atomic, so a reader never sees a half-written file.
    mv "$ENV_FILE.tmp" "$ENV_FILE"

    if [ -n "$watch_pid" ]; then
        start_watcher "$watch_pid" || true
    fi

    note "legacy instance up in $DIR (smtp $SMTP_PORT, imap $IMAP_PORT, pop3 $POP3_PORT)"
}

# Background watcher: stop the instance once PID has exited.
do_watch() {
    watch_until_gone "$1" "$2"
    LEGACY_WATCHER_PID=$$ do_stop
    echo "$(date -Is) stopped"
}

# ---------------------------------------------------------------- main

[ "$(id -u)" -eq 0 ] || die "must run as root (private postfix/dovecot instances)"
[ $# -ge 2 ] || usage

SMTP_PORT=${LEGACY_SMTP_PORT:-2525}
IMAP_PORT=${LEGACY_IMAP_PORT:-1143}
POP3_PORT=${LEGACY_POP3_PORT:-1110}

cmd=$1
set_paths "$2"
shift 2

case "$cmd" in
    start)
        watch=
        if [ $# -gt 0 ]; then
            [ "$1" = --watch ] && [ $# -eq 2 ] || usage
            case "$2" in ''|*[!0-9]*) die "--watch needs a numeric PID" ;; esac
            watch=$2
        fi
        do_start "$watch"
        ;;
    stop)
        [ $# -eq 0 ] || usage
        [ -d "$DIR" ] || exit 0
        mkdir -p "$LOG_DIR"
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
