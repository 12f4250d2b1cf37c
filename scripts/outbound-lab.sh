#!/usr/bin/env bash
# The outbound relay's test lab (ARCHITECTURE.md §11, issue 15): DNSSEC, DANE, MTA-STS,
# remote MXes and a legacy sender, all on loopback, no network. Everything lives under
# DIR; the addresses are 127.NET.x.y, so labs with different NETs run side by side.
#
#   outbound-lab.sh start DIR [--watch PID]   (re)start the lab, write DIR/lab.env
#   outbound-lab.sh stop DIR                  stop it (tolerates already stopped)
#
# env: OUTBOUND_LAB_NET (0..255, default 0): the second octet of every lab address.
#      OUTBOUND_LAB_RELAY_PORT (10026): the legacy sender's relayhost, [127.0.0.1]:PORT,
#        where mailmoat's outbound listener is to be.
#      OUTBOUND_LAB_SENDER_EXTRA: "name = value" lines set in the sender's main.cf.
#
# What runs (N is OUTBOUND_LAB_NET):
#   127.N.2.1:53   knot, authoritative for test. and its children, signing on the fly
#                  (dnssec-signing, one ECDSA P-256 CSK per zone, made by keymgr at start)
#   127.N.2.2:53   unbound, validating; its one trust anchor is test.'s DS, so the chain
#                  of trust runs through real DS records in test.: dane.test. and
#                  sts.test. are secure, plain.test. an insecure delegation (no DS),
#                  bogus.test. signed but with a wrong DS in test. (SERVFAIL)
#   127.N.3.1:25   MX "good": STARTTLS, certificate for mx1.dane.test, mx.sts.test,
#                  mx.plain.test and mx1.bogus.test from the lab CA
#   127.N.3.2:25   MX mx2.dane.test: STARTTLS (TLSA 2 0 1 of the lab CA)
#   127.N.3.3:25   MX mx3.dane.test: STARTTLS, valid certificate, wrong TLSA (3 1 1 of
#                  an unrelated key)
#   127.N.3.4:25   MX without STARTTLS (mx-notls.dane.test, which has a TLSA record, and
#                  mx-notls.plain.test)
#   127.N.3.5:25   MX with a certificate for wrong-name.test (mx-wrongname.sts.test,
#                  mx-wrongname.plain.test)
#   127.N.4.1:443  nginx: the MTA-STS policy hosts mta-sts.<domain> (lab CA certificate)
#   127.N.5.1:25   the legacy sender: Postfix without TLS, relayhost [127.0.0.1]:PORT
# The five MXes are one Postfix instance with one smtpd service per address, each with
# its own host name (banner and Received header), TLS settings and cleanup service; the
# cleanup rewrites every recipient to that MX's own Maildir (DIR/mail/<mx>/Maildir), and
# the original recipient is in X-Original-To. smtpd_tls_received_header is on.
#
# Mail domains:
#   dane.test            MX 10 mx1.dane.test (3 1 1), 20 mx2.dane.test (2 0 1)
#   ta.dane.test         MX 10 mx2.dane.test (2 0 1 of the CA only)
#   badtlsa.dane.test    MX 10 mx3.dane.test (TLSA never matches)
#   fallback.dane.test   MX 10 mx3.dane.test, 20 mx1.dane.test
#   notls.dane.test      MX 10 mx-notls.dane.test (TLSA, but no STARTTLS)
#   alias.dane.test      CNAME mx1.dane.test
#   sts.test             MTA-STS enforce, mx: mx.sts.test; MX 10 mx.sts.test
#   testing.sts.test     MTA-STS testing, mx: mx-wrongname.sts.test; MX the same
#   badcert.sts.test     MTA-STS enforce, mx: mx-wrongname.sts.test; MX the same
#   unlisted.sts.test    MTA-STS enforce, mx: mx.sts.test; MX 10 mx.plain.test
#   plain.test           unsigned; MX 10 mx.plain.test
#   notls.plain.test     unsigned; MX 10 mx-notls.plain.test
#   wrongname.plain.test unsigned; MX 10 mx-wrongname.plain.test
#   bogus.test           MX 10 mx1.bogus.test, but bogus (SERVFAIL)
# The TLSA data is computed from the certificates made at start (openssl), and written
# to lab.env with every address, port and path a test needs.
#
# Exit codes: 0 up, 1 failed, 69 a program is missing (scripts/install-deps.sh installs
# them all), 75 a lab address is in use (another lab on this NET?).
set -euo pipefail

PROG=$(basename "$0")
SELF=$(readlink -f "$0")
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$SELF")/lib/instance.sh"

usage() {
    cat >&2 <<EOF
usage: $PROG start DIR [--watch PID]
       $PROG stop DIR
env:   OUTBOUND_LAB_NET (0) OUTBOUND_LAB_RELAY_PORT (10026)
       OUTBOUND_LAB_SENDER_EXTRA ("name = value" lines set in the sender's main.cf)
EOF
    exit 2
}

# Unix socket paths are limited to 107 bytes; the deepest is Postfix's
# DIR/sender/spool/private/proxywrite (DIR + 34).
MAX_DIR_LEN=70

REQUIRED=(knotd keymgr kdig unbound nginx postfix postconf postqueue sendmail openssl)

set_paths() {
    # The path goes unquoted into every config file and into lab.env.
    set_dir "$1" "unix socket path limit"
    CERTS=$DIR/certs
    KNOT=$DIR/knot
    KNOT_CONF=$KNOT/knot.conf
    ZONES=$KNOT/zones
    UNBOUND_CONF=$DIR/unbound/unbound.conf
    NGINX=$DIR/nginx
    NGINX_CONF=$NGINX/nginx.conf
    WWW=$DIR/www
    MX_CONF=$DIR/mx/postfix
    MX_QUEUE=$DIR/mx/spool
    SENDER_CONF=$DIR/sender/postfix
    SENDER_QUEUE=$DIR/sender/spool
    MAIL_DIR=$DIR/mail
    RUN=$DIR/run
    LOG_DIR=$DIR/log
    WATCH_PID_FILE=$RUN/watch.pid
    ENV_FILE=$DIR/lab.env
}

set_addresses() {
    local net=$1
    case "$net" in '' | *[!0-9]*) die "OUTBOUND_LAB_NET must be 0..255: $net" ;; esac
    [ "$net" -le 255 ] || die "OUTBOUND_LAB_NET must be 0..255: $net"
    NET=$net
    AUTH_DNS=127.$net.2.1
    RESOLVER=127.$net.2.2
    MX_GOOD=127.$net.3.1
    MX_TA=127.$net.3.2
    MX_BADTLSA=127.$net.3.3
    MX_NOTLS=127.$net.3.4
    MX_WRONGNAME=127.$net.3.5
    STS_HOST=127.$net.4.1
    SENDER=127.$net.5.1
}

# Name (for the service, the cleanup and the Maildir), address, host name of each MX.
MXES=(mx1 mx2 mx3 notls wrongname)

# The MX's part of its lab.env names: LAB_MX1, LAB_MX_NOTLS_NAME, LAB_MAILDIR_MX2...
mx_key() {
    case "$1" in
        mx*) echo "${1^^}" ;;
        *) echo "MX_${1^^}" ;;
    esac
}

mx_address() {
    case "$1" in
        mx1) echo "$MX_GOOD" ;;
        mx2) echo "$MX_TA" ;;
        mx3) echo "$MX_BADTLSA" ;;
        notls) echo "$MX_NOTLS" ;;
        wrongname) echo "$MX_WRONGNAME" ;;
    esac
}

mx_hostname() {
    case "$1" in
        mx1) echo mx1.dane.test ;;
        mx2) echo mx2.dane.test ;;
        mx3) echo mx3.dane.test ;;
        notls) echo mx-notls.dane.test ;;
        wrongname) echo wrong-name.test ;;
    esac
}

# The MTA-STS domains: domain, mode, the policy's mx patterns.
STS_DOMAINS=("sts.test enforce mx.sts.test"
    "testing.sts.test testing mx-wrongname.sts.test"
    "badcert.sts.test enforce mx-wrongname.sts.test"
    "unlisted.sts.test enforce mx.sts.test")

# Does the command line of PID contain TEXT (as bytes, anywhere)? nginx rewrites its
# arguments into one string, so proc_has's whole-entry match cannot find it.
cmdline_contains() { # PID TEXT
    [ -n "$1" ] || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# ---------------------------------------------------------------- stop

kill_watcher() {
    local pid
    pid=$(live_pid "$WATCH_PID_FILE") || { rm -f "$WATCH_PID_FILE"; return 0; }
    proc_has "$pid" cmdline "__watch" || { rm -f "$WATCH_PID_FILE"; return 0; }
    # The watcher runs "stop" itself; it must not kill itself half way.
    if [ "$pid" != "${OUTBOUND_LAB_WATCHER_PID:-}" ]; then
        kill "$pid" 2>/dev/null || true
    fi
    rm -f "$WATCH_PID_FILE"
}

# Every Postfix program of the instance in CONF that is still running: "master -t" (run
# by postfix-script) starts a session of its own and would outlive a stuck "postfix
# stop", and so would a postlog blocked on the log socket. Only Postfix's own binaries.
postfix_stragglers() { # CONF
    local conf=$1 bin_dirs p exe d
    bin_dirs=$(postconf -c "$conf" -h daemon_directory command_directory 2>/dev/null) ||
        bin_dirs="/usr/lib/postfix/sbin /usr/sbin"
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        proc_has "$p" environ "MAIL_CONFIG=$conf" || continue
        exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
        for d in $bin_dirs; do
            [ "$(dirname "$exe")" = "$d" ] && echo "$p"
        done
    done
}

do_stop() {
    local pids=() p i knot unbound nginx mx sender
    kill_watcher

    # Remember every process of the lab before asking it to stop, so that stragglers
    # can be killed and nothing is left behind. A stale pid file may name an unrelated
    # process now: only processes that really belong to this DIR count.
    knot=$(live_pid "$RUN/knot.pid" || true)
    unbound=$(live_pid "$RUN/unbound.pid" || true)
    nginx=$(live_pid "$RUN/nginx.pid" || true)
    mx=$(live_pid "$MX_QUEUE/pid/master.pid" || true)
    sender=$(live_pid "$SENDER_QUEUE/pid/master.pid" || true)
    proc_has "$knot" cmdline "$KNOT_CONF" || knot=
    proc_has "$unbound" cmdline "$UNBOUND_CONF" || unbound=
    cmdline_contains "$nginx" "$NGINX_CONF" || nginx=
    proc_has "$mx" environ "MAIL_CONFIG=$MX_CONF" || mx=
    proc_has "$sender" environ "MAIL_CONFIG=$SENDER_CONF" || sender=
    for p in $knot $unbound $nginx $mx $sender; do
        pids+=("$p")
        for i in $(descendants "$p"); do pids+=("$i"); done
    done

    # Bounded: "postfix stop" blocks for good if Postfix's logging is stuck. Both at
    # once, and the others are signalled meanwhile.
    local conf stoppers=()
    for conf in ${mx:+"$MX_CONF"} ${sender:+"$SENDER_CONF"}; do
        {
            timeout -k 2 10 postfix -c "$conf" stop ||
                timeout -k 2 5 postfix -c "$conf" abort || true
        } </dev/null >>"$LOG_DIR/control.log" 2>&1 &
        stoppers+=($!)
    done
    for p in $knot $unbound $nginx; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${stoppers[@]}"; do wait "$p" || true; done

    # Wait up to 10 s for a clean exit, then kill what is left.
    wait_gone 100 "${pids[@]}" || true
    for p in "${pids[@]}"; do
        kill -9 "$p" 2>/dev/null || true
    done
    local swept=()
    for conf in "$MX_CONF" "$SENDER_CONF"; do
        [ -f "$conf/main.cf" ] || continue
        for p in $(postfix_stragglers "$conf"); do
            kill -9 "$p" 2>/dev/null || true
            swept+=("$p")
        done
    done
    # SIGKILL lands asynchronously: wait (bounded) until every one is gone.
    wait_gone 50 "${pids[@]}" "${swept[@]}" || true
    rm -f "$RUN/knot.pid" "$RUN/unbound.pid" "$RUN/nginx.pid" "$RUN/knot.sock"
}

# ---------------------------------------------------------------- certificates

# The SHA-256 of stdin, as lower-case hex.
sha256_hex() {
    openssl dgst -sha256 -r | cut -d' ' -f1
}

# An ECDSA P-256 key at FILE.
new_key() { # FILE
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# A leaf certificate NAME.pem (leaf then CA) with NAME.key, for the DNS names given.
new_leaf() { # NAME DNS-NAME...
    local name=$1 san d
    shift
    san=
    for d in "$@"; do san+=${san:+,}DNS:$d; done
    new_key "$CERTS/$name.key"
    openssl req -new -key "$CERTS/$name.key" -subj "/CN=$1" -out "$CERTS/$name.csr" 2>/dev/null
    openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
        -set_serial "0x$(openssl rand -hex 8)" -days 30 -out "$CERTS/$name.leaf.pem" \
        -extfile <(printf '%s\n' "subjectAltName=$san" "extendedKeyUsage=serverAuth" \
            "keyUsage=critical,digitalSignature" "basicConstraints=critical,CA:FALSE" \
            "authorityKeyIdentifier=keyid") 2>/dev/null
    cat "$CERTS/$name.leaf.pem" "$CERTS/ca.pem" >"$CERTS/$name.pem"
    rm -f "$CERTS/$name.csr"
}

# TLSA association data: selector 1 (SPKI) or 0 (whole certificate), matching 1
# (SHA-256), of the certificate in FILE (RFC 6698 §2.1).
tlsa_data() { # SELECTOR FILE
    case "$1" in
        0) openssl x509 -in "$2" -outform DER | sha256_hex ;;
        1) openssl x509 -in "$2" -noout -pubkey | openssl pkey -pubin -outform DER | sha256_hex ;;
    esac
}

write_certs() {
    mkdir -p "$CERTS"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$CERTS/ca.key" -out "$CERTS/ca.pem" -days 30 \
        -subj "/CN=mailmoat outbound lab CA" \
        -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    local names=() entry makers=() p
    for entry in "${STS_DOMAINS[@]}"; do
        names+=("mta-sts.${entry%% *}")
    done
    # At once: openssl's start-up is most of the time each takes.
    new_leaf mx1 mx1.dane.test mx.sts.test mx.plain.test mx1.bogus.test &
    makers+=($!)
    new_leaf mx2 mx2.dane.test &
    makers+=($!)
    new_leaf mx3 mx3.dane.test &
    makers+=($!)
    new_leaf wrongname wrong-name.test &
    makers+=($!)
    new_leaf mta-sts "${names[@]}" &
    makers+=($!)
    # Matches nothing the lab serves: mx3's TLSA record.
    new_leaf unrelated unrelated.test &
    makers+=($!)
    for p in "${makers[@]}"; do
        wait "$p" || die "openssl could not make the lab's certificates"
    done
    # Daemons load their keys as root, before they drop privileges.
    chmod 0600 "$CERTS"/*.key

    TLSA_MX1="3 1 1 $(tlsa_data 1 "$CERTS/mx1.leaf.pem")"
    TLSA_MX2="2 0 1 $(tlsa_data 0 "$CERTS/ca.pem")"
    TLSA_MX3="3 1 1 $(tlsa_data 1 "$CERTS/unrelated.leaf.pem")"
}

# ---------------------------------------------------------------- DNS

SIGNED_ZONES=(test dane.test sts.test bogus.test)
ZONES_ALL=(test dane.test sts.test bogus.test plain.test)

write_knot() {
    mkdir -p "$ZONES" "$KNOT/db"
    cat >"$KNOT_CONF" <<EOF
# Generated by scripts/outbound-lab.sh - authoritative DNS of the outbound lab.
server:
    listen: $AUTH_DNS@53
    rundir: $RUN
    pidfile: $RUN/knot.pid
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
control:
    listen: $RUN/knot.sock
log:
  - target: $LOG_DIR/knot.log
    any: info
database:
    storage: $KNOT/db
# Keys made by keymgr before knotd starts (so test.'s DS records are known), used as
# they are: no rollovers.
policy:
  - id: lab
    algorithm: ecdsap256sha256
    single-type-signing: on
    manual: on
template:
  - id: default
    storage: $ZONES
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
  - id: signed
    storage: $ZONES
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    dnssec-signing: on
    dnssec-policy: lab
zone:
EOF
    local z
    for z in "${ZONES_ALL[@]}"; do
        case " ${SIGNED_ZONES[*]} " in
            *" $z "*) printf '  - domain: %s.\n    template: signed\n' "$z" ;;
            *) printf '  - domain: %s.\n' "$z" ;;
        esac >>"$KNOT_CONF"
    done
    for z in "${SIGNED_ZONES[@]}"; do
        keymgr -c "$KNOT_CONF" "$z." generate algorithm=ecdsap256sha256 ksk=yes zsk=yes \
            >>"$LOG_DIR/control.log" 2>&1 || die "keymgr could not make a key for $z."
    done
}

# The DS record (SHA-256) of ZONE's key, as "ZONE. DS TAG 13 2 HEX".
zone_ds() { # ZONE
    keymgr -c "$KNOT_CONF" "$1." ds | awk '$2 == "DS" && $5 == 2'
}

soa() {
    # shellcheck disable=SC2016 # "$TTL" is the zone file's own directive
    printf '$TTL 300\n@ SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n@ NS ns.test.\n'
}

write_zones() {
    local ds_bogus wrong
    ds_bogus=$(zone_ds bogus.test)
    [ -n "$ds_bogus" ] || die "no DS for bogus.test."
    # The right key tag and algorithm, a digest of nothing the zone has: bogus.
    wrong=$(printf 'not the key of bogus.test' | sha256_hex)
    {
        soa
        echo "ns A $AUTH_DNS"
        echo "dane NS ns.test."
        zone_ds dane.test
        echo "sts NS ns.test."
        zone_ds sts.test
        echo "bogus NS ns.test."
        echo "${ds_bogus% *} $wrong"
        echo "; insecure delegation: no DS"
        echo "plain NS ns.test."
    } >"$ZONES/test.zone"

    {
        soa
        echo "@ MX 10 mx1"
        echo "@ MX 20 mx2"
        echo "ta MX 10 mx2"
        echo "badtlsa MX 10 mx3"
        echo "fallback MX 10 mx3"
        echo "fallback MX 20 mx1"
        echo "notls MX 10 mx-notls"
        echo "alias CNAME mx1"
        echo "mx1 A $MX_GOOD"
        echo "mx2 A $MX_TA"
        echo "mx3 A $MX_BADTLSA"
        echo "mx-notls A $MX_NOTLS"
        echo "_25._tcp.mx1 TLSA $TLSA_MX1"
        echo "_25._tcp.mx2 TLSA $TLSA_MX2"
        echo "_25._tcp.mx3 TLSA $TLSA_MX3"
        echo "_25._tcp.mx-notls TLSA $TLSA_MX1"
    } >"$ZONES/dane.test.zone"

    local entry domain mode mx label
    {
        soa
        echo "mx A $MX_GOOD"
        echo "mx-wrongname A $MX_WRONGNAME"
        for entry in "${STS_DOMAINS[@]}"; do
            read -r domain mode mx <<<"$entry"
            label=${domain%sts.test}
            case "$domain" in
                unlisted.*) echo "${label}sts.test. MX 10 mx.plain.test." ;;
                *) echo "${label}sts.test. MX 10 $mx." ;;
            esac
            echo "_mta-sts.${label}sts.test. TXT \"v=STSv1; id=$STS_ID\""
            echo "mta-sts.${label}sts.test. A $STS_HOST"
        done
    } >"$ZONES/sts.test.zone"

    {
        soa
        echo "@ MX 10 mx"
        echo "notls MX 10 mx-notls"
        echo "wrongname MX 10 mx-wrongname"
        echo "mx A $MX_GOOD"
        echo "mx-notls A $MX_NOTLS"
        echo "mx-wrongname A $MX_WRONGNAME"
    } >"$ZONES/plain.test.zone"

    {
        soa
        echo "@ MX 10 mx1"
        echo "mx1 A $MX_GOOD"
        echo "_25._tcp.mx1 TLSA $TLSA_MX1"
    } >"$ZONES/bogus.test.zone"
}

write_unbound() {
    mkdir -p "$DIR/unbound"
    TRUST_ANCHOR=$(zone_ds test)
    [ -n "$TRUST_ANCHOR" ] || die "no DS for test."
    cat >"$UNBOUND_CONF" <<EOF
# Generated by scripts/outbound-lab.sh - the validating resolver of the outbound lab.
server:
    username: ""
    chroot: ""
    directory: "$DIR/unbound"
    pidfile: "$RUN/unbound.pid"
    logfile: "$LOG_DIR/unbound.log"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    interface: $RESOLVER@53
    access-control: 127.0.0.0/8 allow
    do-ip6: no
    num-threads: 1
    so-reuseport: no
    # knot is on loopback; test. is one of unbound's default (blocking) local zones.
    do-not-query-localhost: no
    local-zone: "test." nodefault
    # The only trust anchor (no root key): test.'s own DS. Anything else is insecure.
    trust-anchor: "$TRUST_ANCHOR"
    # SERVFAIL says why (RFC 8914), e.g. "DNSSEC Bogus".
    ede: yes
stub-zone:
    name: "test."
    stub-addr: $AUTH_DNS@53
remote-control:
    control-enable: no
EOF
}

# kdig's answer to QTYPE NAME from SERVER, with DNSSEC records.
dig_at() { # SERVER QTYPE NAME
    timeout 5 kdig "@$1" +dnssec +timeout=2 +retry=0 "$2" "$3" 2>&1
}

# Knot serves every zone, the signed ones signed.
knot_ready() {
    local z out
    for z in "${ZONES_ALL[@]}"; do
        out=$(dig_at "$AUTH_DNS" SOA "$z.") || return 1
        grep -q "status: NOERROR" <<<"$out" || return 1
        grep -q "IN[[:space:]]*SOA" <<<"$out" || return 1
        case " ${SIGNED_ZONES[*]} " in
            *" $z "*) grep -q "RRSIG[[:space:]]*SOA" <<<"$out" || return 1 ;;
        esac
    done
}

# The flags line of kdig's answer, e.g. ";; Flags: qr rd ra ad; ...".
has_ad() { grep -q '^;; Flags:[^;]* ad[ ;]' <<<"$1"; }

# Through unbound: the signed zones secure, plain.test insecure, bogus.test SERVFAIL.
resolver_ready() {
    local z out
    for z in dane.test sts.test; do
        out=$(dig_at "$RESOLVER" SOA "$z.") || return 1
        grep -q "status: NOERROR" <<<"$out" && has_ad "$out" || return 1
    done
    out=$(dig_at "$RESOLVER" MX plain.test.) || return 1
    grep -q "status: NOERROR" <<<"$out" && ! has_ad "$out" || return 1
    out=$(dig_at "$RESOLVER" MX bogus.test.) || return 1
    grep -q "status: SERVFAIL" <<<"$out" || return 1
}

# ---------------------------------------------------------------- MTA-STS host

write_nginx() {
    mkdir -p "$NGINX/tmp" "$WWW"
    local entry domain mode mx policy
    {
        cat <<EOF
# Generated by scripts/outbound-lab.sh - the MTA-STS policy hosts of the outbound lab.
pid $RUN/nginx.pid;
error_log $LOG_DIR/nginx-error.log;
user www-data;
worker_processes 1;
events {
    worker_connections 64;
}
http {
    access_log $LOG_DIR/nginx-access.log;
    client_body_temp_path $NGINX/tmp/body;
    proxy_temp_path $NGINX/tmp/proxy;
    fastcgi_temp_path $NGINX/tmp/fastcgi;
    uwsgi_temp_path $NGINX/tmp/uwsgi;
    scgi_temp_path $NGINX/tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $CERTS/mta-sts.pem;
    ssl_certificate_key $CERTS/mta-sts.key;
    server {
        listen $STS_HOST:443 ssl default_server;
        return 404;
    }
EOF
        for entry in "${STS_DOMAINS[@]}"; do
            read -r domain mode mx <<<"$entry"
            mkdir -p "$WWW/mta-sts.$domain/.well-known"
            # RFC 8461 §3.2; lines may end in CRLF or LF, CRLF here.
            policy=$WWW/mta-sts.$domain/.well-known/mta-sts.txt
            printf 'version: STSv1\r\nmode: %s\r\nmx: %s\r\nmax_age: 86400\r\n' "$mode" "$mx" >"$policy"
            cat <<EOF
    server {
        listen $STS_HOST:443 ssl;
        server_name mta-sts.$domain;
        root $WWW/mta-sts.$domain;
        location = /.well-known/mta-sts.txt {
            types { }
            default_type text/plain;
        }
        location / {
            return 404;
        }
    }
EOF
        done
        echo "}"
    } >"$NGINX_CONF"
    chmod -R a+rX "$WWW"
}

# ---------------------------------------------------------------- Postfix

# master.cf lines every instance has (chroot "n": the queue lives under DIR).
postfix_master_common() {
    cat <<EOF
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
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
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

# main.cf lines every instance has.
postfix_main_common() { # NAME QUEUE
    cat <<EOF
compatibility_level = 3.6
queue_directory = $2
data_directory = $DIR/$1/data
# No syslog in the sandbox: log through postlogd to a file.
maillog_file = $LOG_DIR/$1.log
maillog_file_prefixes = $LOG_DIR
mydomain = lab.invalid
mydestination =
biff = no
append_dot_mydomain = no
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtpd_client_event_limit_exceptions = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:no local delivery in the outbound lab
EOF
}

write_mx() {
    local mail_uid mail_gid m
    mail_uid=$(id -u mail) || die "no 'mail' user"
    mail_gid=$(id -g mail)
    mkdir -p "$MX_CONF" "$MX_QUEUE"
    chown root:root "$MX_QUEUE" && chmod 0755 "$MX_QUEUE"
    : >"$MX_CONF/vmailbox"
    for m in "${MXES[@]}"; do
        mkdir -p "$MAIL_DIR/$m/Maildir/"{cur,new,tmp}
        echo "$m@lab.invalid $m/Maildir/" >>"$MX_CONF/vmailbox"
    done
    chown -R "$mail_uid:$mail_gid" "$MAIL_DIR"
    chmod 0755 "$MAIL_DIR"

    {
        echo "# Generated by scripts/outbound-lab.sh - the remote MXes of the outbound lab."
        postfix_main_common mx "$MX_QUEUE"
        cat <<EOF
myhostname = mx.lab.invalid
smtpd_banner = \$myhostname ESMTP lab
# Postfix accepts only interface addresses here (lo has 127.0.0.1); master.cf binds
# each service to its own 127.N.x.y all the same.
inet_interfaces = loopback-only
# Each smtpd service turns TLS on for itself.
smtpd_tls_security_level = none
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtp_tls_security_level = none
virtual_mailbox_domains = lab.invalid
virtual_mailbox_base = $MAIL_DIR
virtual_mailbox_maps = texthash:$MX_CONF/vmailbox
virtual_minimum_uid = $mail_uid
virtual_uid_maps = static:$mail_uid
virtual_gid_maps = static:$mail_gid
virtual_mailbox_limit = 0
mailbox_size_limit = 0
message_size_limit = 52428800
# Nothing leaves: every recipient is rewritten to its MX's Maildir by the cleanup
# service. smtpd does not see that rewriting, and refuses a recipient whose transport
# is "error", so the transport the rewriting makes unused is "discard".
default_transport = discard:every recipient goes to its MX's Maildir
relay_transport = discard:every recipient goes to its MX's Maildir
EOF
    } >"$MX_CONF/main.cf"

    {
        echo "# service type  private unpriv  chroot  wakeup  maxproc command + args"
        local tls
        for m in "${MXES[@]}"; do
            case "$m" in
                notls) tls="-o smtpd_tls_security_level=none" ;;
                *) tls="-o smtpd_tls_security_level=may -o smtpd_tls_chain_files=$CERTS/$m.key,$CERTS/$m.pem" ;;
            esac
            echo "$(mx_address "$m"):25 inet n - n - - smtpd -o myhostname=$(mx_hostname "$m") -o cleanup_service_name=cleanup-$m $tls"
            echo "cleanup-$m unix n - n - 0 cleanup -o virtual_alias_maps=static:$m@lab.invalid"
        done
        postfix_master_common
        echo "virtual   unix  -       n       n       -       -       virtual"
    } >"$MX_CONF/master.cf"
}

write_sender() {
    mkdir -p "$SENDER_CONF" "$SENDER_QUEUE"
    chown root:root "$SENDER_QUEUE" && chmod 0755 "$SENDER_QUEUE"
    {
        echo "# Generated by scripts/outbound-lab.sh - the outbound lab's legacy sender."
        postfix_main_common sender "$SENDER_QUEUE"
        cat <<EOF
myhostname = legacy-sender.lab.invalid
myorigin = \$myhostname
smtpd_banner = \$myhostname ESMTP legacy sender
inet_interfaces = loopback-only
# A legacy MTA that cannot do TLS: mailmoat is its relayhost.
smtpd_tls_security_level = none
smtp_tls_security_level = none
relayhost = [127.0.0.1]:$RELAY_PORT
smtp_connect_timeout = 5s
EOF
    } >"$SENDER_CONF/main.cf"
    local setting
    while IFS= read -r setting; do
        case "$setting" in '' | '#'*) continue ;; esac
        case "$setting" in
            [A-Za-z]*=*) ;;
            *) die "OUTBOUND_LAB_SENDER_EXTRA: not a \"name = value\" line: $setting" ;;
        esac
        postconf -c "$SENDER_CONF" -e "$setting" </dev/null >>"$LOG_DIR/control.log" 2>&1 ||
            die "OUTBOUND_LAB_SENDER_EXTRA: postconf refused: $setting"
    done <<<"${OUTBOUND_LAB_SENDER_EXTRA:-}"
    {
        echo "# service type  private unpriv  chroot  wakeup  maxproc command + args"
        echo "$SENDER:25 inet n - n - - smtpd"
        postfix_master_common
        echo "smtp      unix  -       -       n       -       -       smtp"
        echo "relay     unix  -       -       n       -       -       smtp"
    } >"$SENDER_CONF/master.cf"
}

# A warning every Postfix daemon logs as it starts can deadlock its logging (see
# legacy.sh's refuse_postfix_warnings): refused here, in Postfix's own words.
refuse_postfix_warnings() { # CONF
    local warnings
    warnings=$(postconf -c "$1" -n 2>&1 >/dev/null </dev/null) ||
        die "postconf cannot read $1/main.cf: $warnings"
    [ -z "$warnings" ] || die "refusing $1/main.cf, which Postfix warns about: $warnings"
}

# ---------------------------------------------------------------- start

print_logs() {
    print_tails 40 "$LOG_DIR/control.log" "$LOG_DIR/knot.log" "$LOG_DIR/unbound.log" \
        "$LOG_DIR/nginx-error.log" "$LOG_DIR/mx.log" "$LOG_DIR/sender.log"
}

fail() {
    note "$*"
    print_logs
    do_stop
    exit 1
}

# Waits (bounded: 20 s) until CHECK succeeds, or fails the start naming WHAT.
await() { # WHAT CHECK...
    local what=$1 deadline=$((SECONDS + 20))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
        sleep 0.1
    done
}

mx_banners() {
    local m
    for m in "${MXES[@]}"; do
        banner_at "$(mx_address "$m")" 25 "220 $(mx_hostname "$m") " || return 1
    done
}

sts_host_up() { addr_in_use "$STS_HOST" 443; }

do_start() {
    local watch_pid=$1 missing=() b

    for b in "${REQUIRED[@]}"; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        note "missing: ${missing[*]} (scripts/install-deps.sh installs them)"
        exit 69
    fi

    # Fresh start: stop whatever this DIR was running before.
    if [ -d "$DIR" ]; then
        do_stop
    fi

    local a
    for a in "$AUTH_DNS:53" "$RESOLVER:53" "$MX_GOOD:25" "$MX_TA:25" "$MX_BADTLSA:25" \
        "$MX_NOTLS:25" "$MX_WRONGNAME:25" "$STS_HOST:443" "$SENDER:25"; do
        if addr_in_use "${a%:*}" "${a##*:}"; then
            note "$a is already in use (another lab? set OUTBOUND_LAB_NET)"
            exit 75
        fi
    done

    # Only what start makes: the rest of DIR (a caller's own files) stays.
    rm -rf "$CERTS" "$KNOT" "$DIR/unbound" "$NGINX" "$WWW" "$DIR/mx" "$DIR/sender" \
        "$MAIL_DIR" "$RUN" "$LOG_DIR" "$ENV_FILE"
    mkdir -p "$DIR" "$RUN" "$LOG_DIR"
    # Postfix (postfix), nginx (www-data) and the mail uid traverse DIR.
    open_ancestors "the lab's daemons"
    chmod 0755 "$DIR" "$RUN" "$LOG_DIR"
    echo "---- start $(date -Is)" >>"$LOG_DIR/control.log"

    STS_ID=lab$(date +%Y%m%d%H%M%S)
    write_certs
    write_knot
    write_zones
    write_unbound
    write_nginx
    write_mx
    write_sender
    # Postfix programs wait until main.cf is about two seconds old before they read it
    # (a file still being edited), and "postfix start" runs several: date it back.
    touch -d '-10 seconds' "$MX_CONF/main.cf" "$SENDER_CONF/main.cf"
    refuse_postfix_warnings "$MX_CONF"
    refuse_postfix_warnings "$SENDER_CONF"
    : >>"$LOG_DIR/mx.log"
    : >>"$LOG_DIR/sender.log"

    # Stdio to a file: the daemons must not keep a caller's capture pipe open. The two
    # Postfix instances start at once (postfix-script's checks take a while).
    local conf starters=() p
    for conf in "$MX_CONF" "$SENDER_CONF"; do
        postfix -c "$conf" start </dev/null >>"$LOG_DIR/control.log" 2>&1 &
        starters+=($!)
    done
    knotd -c "$KNOT_CONF" -d </dev/null >>"$LOG_DIR/control.log" 2>&1 ||
        fail "knotd failed to start"
    nginx -c "$NGINX_CONF" -e "$LOG_DIR/nginx-error.log" -p "$NGINX/" \
        </dev/null >>"$LOG_DIR/control.log" 2>&1 || fail "nginx failed to start"
    await "knot to serve the signed zones" knot_ready
    # After knot, so that unbound never caches knot's absence.
    unbound -c "$UNBOUND_CONF" </dev/null >>"$LOG_DIR/control.log" 2>&1 ||
        fail "unbound failed to start"
    for p in "${starters[@]}"; do
        wait "$p" || fail "postfix failed to start"
    done
    await "unbound to validate the lab zones" resolver_ready
    await "the MX banners" mx_banners
    await "the MTA-STS host" sts_host_up
    await "the legacy sender's banner" banner_at "$SENDER" 25 "220 "

    local m
    {
        echo "LAB_NET=$NET"
        echo "LAB_AUTH_DNS=$AUTH_DNS:53"
        echo "LAB_RESOLVER=$RESOLVER:53"
        echo "LAB_TRUST_ANCHOR=\"$TRUST_ANCHOR\""
        echo "LAB_ZONES=$ZONES"
        echo "LAB_CA=$CERTS/ca.pem"
        echo "LAB_CERTS=$CERTS"
        echo "LAB_MX_PORT=25"
        for m in "${MXES[@]}"; do
            echo "LAB_$(mx_key "$m")=$(mx_address "$m")"
            echo "LAB_$(mx_key "$m")_NAME=$(mx_hostname "$m")"
            echo "LAB_MAILDIR_$(mx_key "$m")=$MAIL_DIR/$m/Maildir"
        done
        echo "LAB_TLSA_MX1=\"$TLSA_MX1\""
        echo "LAB_TLSA_MX2=\"$TLSA_MX2\""
        echo "LAB_TLSA_MX3=\"$TLSA_MX3\""
        echo "LAB_MX_POSTFIX=$MX_CONF"
        echo "LAB_MX_LOG=$LOG_DIR/mx.log"
        echo "LAB_STS_HOST=$STS_HOST:443"
        echo "LAB_STS_ID=$STS_ID"
        echo "LAB_STS_WWW=$WWW"
        echo "LAB_SENDER_SMTP=$SENDER:25"
        echo "LAB_SENDER_POSTFIX=$SENDER_CONF"
        echo "LAB_SENDER_LOG=$LOG_DIR/sender.log"
        echo "LAB_RELAYHOST=[127.0.0.1]:$RELAY_PORT"
        echo "LAB_LOG_DIR=$LOG_DIR"
    } >"$ENV_FILE.tmp"
    # Atomic, so a reader never sees a half-written file.
    mv "$ENV_FILE.tmp" "$ENV_FILE"

    if [ -n "$watch_pid" ]; then
        start_watcher "$watch_pid" || true
    fi

    note "outbound lab up in $DIR (net 127.$NET, resolver $RESOLVER:53)"
}

# Background watcher: stop the lab once PID has exited.
do_watch() {
    watch_until_gone "$1" "$2"
    OUTBOUND_LAB_WATCHER_PID=$$ do_stop
    echo "$(date -Is) stopped"
}

# ---------------------------------------------------------------- main

[ "$(id -u)" -eq 0 ] || die "must run as root (port 25 and 53, private Postfix instances)"
[ $# -ge 2 ] || usage

set_addresses "${OUTBOUND_LAB_NET:-0}"
RELAY_PORT=${OUTBOUND_LAB_RELAY_PORT:-10026}
case "$RELAY_PORT" in '' | *[!0-9]*) die "OUTBOUND_LAB_RELAY_PORT must be a port number" ;; esac

cmd=$1
set_paths "$2"
shift 2

case "$cmd" in
    start)
        watch=
        if [ $# -gt 0 ]; then
            if [ "$1" != --watch ] || [ $# -ne 2 ]; then usage; fi
            case "$2" in '' | *[!0-9]*) die "--watch needs a numeric PID" ;; esac
            watch=$2
        fi
        do_start "$watch"
        ;;
    stop)
        [ $# -eq 0 ] || usage
        [ -d "$DIR" ] || exit 0
        mkdir -p "$LOG_DIR" "$RUN"
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
