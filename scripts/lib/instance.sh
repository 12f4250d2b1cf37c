# shellcheck shell=bash
# What scripts/legacy.sh, scripts/exim.sh and scripts/outbound-lab.sh share: each runs
# private server instances under a directory of its own. Sourced, never run; the script that sources it
# sets PROG (its name, for messages), and for the watcher WATCH_PID_FILE.
#
# Processes are read from /proc, so neither script needs procps.

die() { echo "$PROG: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

# ---------------------------------------------------------------- the directory

# Sets DIR to PATH without a trailing slash, or dies unless PATH is absolute, holds
# only [A-Za-z0-9._/+-] (the scripts write it unquoted into the servers' configs and
# their env files) and is at most MAX_DIR_LEN long; WHY, if given, says why that limit.
set_dir() { # PATH [WHY]
    DIR=$1
    case "$DIR" in
        /*) ;;
        *) die "DIR must be an absolute path: $DIR" ;;
    esac
    DIR=${DIR%/}
    case "$DIR" in
        *[!A-Za-z0-9._/+-]*) die "DIR may only contain [A-Za-z0-9._/+-]: $DIR" ;;
    esac
    [ "${#DIR}" -le "$MAX_DIR_LEN" ] ||
        die "DIR is ${#DIR} chars; keep it <= $MAX_DIR_LEN${2:+ ($2)}: $DIR"
}

# Daemons that drop root (WHO, for the message) must traverse every ancestor of DIR;
# temp dirs are often 0700 (e.g. Rust's tempfile), so add o+x (search only).
open_ancestors() { # WHO
    local d
    d=$(dirname "$DIR")
    while [ "$d" != / ] && [ -n "$d" ]; do
        if [ -d "$d" ] && [ "$(( 0$(stat -c %a "$d") & 1 ))" = 0 ]; then
            note "adding o+x to $d so $1 can reach $DIR"
            chmod o+x "$d"
        fi
        d=$(dirname "$d")
    done
}

# The last LINES lines of each FILE that exists, on stderr.
print_tails() { # LINES FILE...
    local lines=$1 f
    shift
    for f in "$@"; do
        [ -e "$f" ] || continue
        echo "==== $f (last $lines lines)" >&2
        tail -n "$lines" "$f" >&2 || true
    done
}

# ---------------------------------------------------------------- ports

port_in_use() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# 127.0.0.1:PORT answers with a banner starting with PREFIX?
banner_ok() { # PORT PREFIX
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        exec 3>&-
        case "$line" in "$2"*) exit 0 ;; *) exit 1 ;; esac
    ' _ "$1" "$2" 2>/dev/null
}

# ADDR:PORT (any loopback address) accepts TCP connections?
addr_in_use() { # ADDR PORT
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# ADDR:PORT answers with a banner starting with PREFIX?
banner_at() { # ADDR PORT PREFIX
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        exec 3>&-
        case "$line" in "$3"*) exit 0 ;; *) exit 1 ;; esac
    ' _ "$1" "$2" "$3" 2>/dev/null
}

# ---------------------------------------------------------------- processes

# pid of a live process recorded in FILE (first line), or nothing.
live_pid() {
    local f=$1 pid
    [ -s "$f" ] || return 1
    pid=$(head -n1 "$f" | tr -dc '0-9')
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# All descendants of PID, from /proc.
descendants() {
    local f pid fields st ppid rest todo=("$1") out=() p
    declare -A kids=()
    for f in /proc/[0-9]*; do
        pid=${f#/proc/}
        fields=$(stat_fields "$pid") || continue
        read -r st ppid rest <<<"$fields"
        kids[$ppid]+=" $pid"
    done
    while [ "${#todo[@]}" -gt 0 ]; do
        p=${todo[0]}
        todo=("${todo[@]:1}")
        for pid in ${kids[$p]:-}; do
            out+=("$pid")
            todo+=("$pid")
        done
    done
    echo "${out[@]:-}"
}

# Fields of /proc/PID/stat after the command name: "state ppid pgrp ...".
# Pure bash (no forks) because it runs for every process on the box.
stat_fields() {
    local line
    { IFS= read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
    echo "${line##*) }"
}

# Exists and is not a zombie (zombies re-parented to a non-reaping init linger).
proc_running() {
    local f
    f=($(stat_fields "$1")) || return 1
    [ "${#f[@]}" -gt 0 ] && [ "${f[0]}" != Z ]
}

# Start time of a process (field 22 of /proc/PID/stat), to detect pid reuse.
proc_start() {
    local f
    f=($(stat_fields "$1")) || return 1
    [ "${#f[@]}" -gt 19 ] || return 1
    echo "${f[19]}"
}

proc_alive() { # PID STARTTIME
    local f
    f=($(stat_fields "$1")) || return 1
    [ "${#f[@]}" -gt 19 ] || return 1
    # A zombie has already exited; its parent just has not reaped it yet.
    [ "${f[0]}" != Z ] && [ "${f[19]}" = "$2" ]
}

# Does /proc/PID/{environ,cmdline} contain ITEM as one NUL-separated entry?
proc_has() { # PID WHAT ITEM
    local pid=$1 what=$2 item=$3 entry
    [ -n "$pid" ] || return 1
    while IFS= read -r -d '' entry; do
        [ "$entry" = "$item" ] && return 0
    done 2>/dev/null <"/proc/$pid/$what"
    return 1
}

# Waits until none of PIDS runs, for at most TENTHS tenths of a second; fails if one
# still does.
wait_gone() { # TENTHS PID...
    local tenths=$1 i p alive
    shift
    for i in $(seq 1 "$tenths"); do
        alive=0
        for p in "$@"; do
            proc_running "$p" && alive=1 && break
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- the watcher

# Starts the background watcher (`SELF __watch DIR PID START`) that stops this instance
# once PID has exited, and waits until it has registered in WATCH_PID_FILE, so that an
# immediate "stop" finds it. Uses the caller's SELF, DIR, LOG_DIR, WATCH_PID_FILE, note
# and do_stop; a PID that does not exist stops the instance and exits 1. Returns 1 when
# the watcher did not register.
start_watcher() { # PID
    local st
    st=$(proc_start "$1" || true)
    [ -n "$st" ] || { note "--watch: pid $1 does not exist; stopping"; do_stop; exit 1; }
    # Fully detached (new session, no inherited stdio) so a caller that captures our
    # output does not wait for the watcher.
    setsid -f bash "$SELF" __watch "$DIR" "$1" "$st" </dev/null >>"$LOG_DIR/watch.log" 2>&1
    for _ in $(seq 1 50); do
        live_pid "$WATCH_PID_FILE" >/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# The background watcher's wait: registers this process in WATCH_PID_FILE and returns
# once PID (started at STARTTIME) has exited, for the caller to stop the instance. A
# later start or stop of this DIR replaces or removes the registration: then the
# instance is no longer this watcher's to stop, and it exits.
watch_until_gone() { # PID STARTTIME
    local pid=$1 st=$2
    echo $$ >"$WATCH_PID_FILE"
    echo "$(date -Is) watcher $$ watching pid $pid"
    while proc_alive "$pid" "$st"; do
        if [ "$(cat "$WATCH_PID_FILE" 2>/dev/null)" != "$$" ]; then
            echo "$(date -Is) watcher $$ superseded, exiting"
            exit 0
        fi
        sleep 1
    done
    echo "$(date -Is) pid $pid gone, stopping instance"
}
