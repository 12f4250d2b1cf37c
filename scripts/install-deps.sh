#!/usr/bin/env bash
# Install the legacy mail stack used by scripts/legacy.sh and scripts/exim.sh (Debian 12,
# run as root). Idempotent: skips apt when everything is already there, and always makes
# sure the system-wide postfix/dovecot are not left running on the standard ports.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "install-deps: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

# fetchmail and isync (mbsync): real POP3 and IMAP clients for tests/e2e_dovecot.rs.
# testssl.sh (command `testssl`) and gnutls-bin (gnutls-cli): scripts/testssl.sh and
# tests/e2e_attack_tools.rs. python3-pip: for command-injection-tester below. systemd:
# systemd-analyze, for tests/systemd_unit.rs (nothing is started). procps and gdb:
# scripts/check.sh shows what a test that overran its time was doing. libnet-ssleay-perl:
# swaks's STARTTLS (only recommended by the package, and recommends are not installed).
# mailutils-imap4d and mailutils-pop3d: GNU Mailutils 3.15, the second legacy IMAP/POP3
# upstream (tests/common/mailutils.rs, tests/e2e_mailutils.rs). They sit beside Dovecot
# (both only Provide imap-server/pop3-server; apt removes nothing) and, like it, must not
# be left running on 143/110 (see the end of this script).
# knot (authoritative DNS, signing on the fly; keymgr), knot-dnsutils (kdig), unbound (the
# validating resolver) and nginx-light (the MTA-STS policy host): scripts/outbound-lab.sh,
# the outbound relay's lab (tests/outbound_lab.rs); its MXes and sender are Postfix.
PKGS=(postfix dovecot-core dovecot-imapd dovecot-pop3d swaks libnet-ssleay-perl openssl curl ca-certificates
    python3 fetchmail isync testssl.sh gnutls-bin python3-pip systemd procps gdb
    mailutils-imap4d mailutils-pop3d knot knot-dnsutils unbound nginx-light)

# Exim 4.96 (scripts/exim.sh, tests/e2e_exim.rs): Debian's exim4-daemon-light conflicts
# with postfix, so it is downloaded and unpacked into the checkout (dpkg -x, never
# installed) at MAILMOAT_EXIM_ROOT (default target/exim/root). The libraries it links
# against are ordinary packages and installed as such (libidn12 is the one a fresh
# machine lacks). exim4-base (cron jobs, exim_* tools, the Debian-exim user's creation)
# is not needed by the binary; the user is created below as its postinst would.
EXIM_VERSION=4.96
EXIM_ROOT=${MAILMOAT_EXIM_ROOT:-$PWD/target/exim/root}
EXIM_LIBS=(libc6 libcrypt1 libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libnsl2 libpcre2-8-0)
PKGS+=("${EXIM_LIBS[@]}")

# command-injection-tester (PyPI): the STARTTLS command injection tester published with
# the NO STARTTLS paper, used by tests/e2e_attack_tools.rs. One stdlib-only script, no
# dependencies; pinned to the version and the wheel's hash.
CIT_VERSION=0.0.2
CIT_SHA256=762ebeefba7255c3f69e5311df0dad033186e4d2c4f119a23120e3f75209c364

# Everything legacy.sh and the tests need; if all present, apt is skipped entirely.
have_all() {
    local b
    for b in postfix postconf postsuper dovecot doveadm swaks openssl curl python3 setsid fetchmail mbsync \
        testssl gnutls-cli stdbuf systemd-analyze ps gdb imap4d pop3d knotd keymgr kdig unbound nginx; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
    # imap/pop3 come from separate packages; the binaries live outside $PATH.
    [ -x /usr/lib/dovecot/imap ] && [ -x /usr/lib/dovecot/pop3 ] &&
        [ -e /usr/lib/dovecot/modules/lib30_imap_zlib_plugin.so ] &&
        [ -s /etc/ssl/certs/ca-certificates.crt ] &&
        perl -MNet::SSLeay -e 1 >/dev/null 2>&1 &&
        python3 -m pip --version >/dev/null 2>&1 || return 1
    for b in "${EXIM_LIBS[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$b" 2>/dev/null)" = "install ok installed" ] || return 1
    done
}

# The pinned command-injection-tester, on $PATH, for the python3 the tests run.
have_cit() {
    command -v command-injection-tester >/dev/null 2>&1 &&
        [ "$(python3 -m pip show command-injection-tester 2>/dev/null | sed -n 's/^Version: //p')" = "$CIT_VERSION" ]
}

# Don't race another apt/dpkg run (e.g. one started in the background by a setup step).
wait_for_apt() {
    local i
    for i in $(seq 1 600); do
        if ! pgrep -x apt-get >/dev/null 2>&1 && ! pgrep -x apt >/dev/null 2>&1 &&
            ! pgrep -x dpkg >/dev/null 2>&1; then
            return 0
        fi
        [ "$i" = 1 ] && log "waiting for a running apt-get/dpkg to finish..."
        sleep 1
    done
    log "timed out waiting for apt-get/dpkg"
    return 1
}

if have_all; then
    log "all packages already present, skipping apt"
else
    wait_for_apt
    # A fresh postfix install asks debconf; "Local only" keeps it off the network even
    # if something does start it.
    printf '%s\n' \
        "postfix postfix/main_mailer_type select Local only" \
        "postfix postfix/mailname string localhost" |
        debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update
    # --no-upgrade: only fill gaps, never upgrade already-installed libs (e.g. libssl)
    # behind the back of whoever else uses this machine.
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends --no-upgrade "${PKGS[@]}"
    if ! have_all; then
        log "packages installed but some binaries are still missing"
        exit 1
    fi
fi

if have_cit; then
    log "command-injection-tester $CIT_VERSION already installed"
else
    req=$(mktemp)
    echo "command-injection-tester==$CIT_VERSION --hash=sha256:$CIT_SHA256" >"$req"
    # Debian's python3 is "externally managed" (PEP 668): pip installs into it (under
    # /usr/local) only when told to. Options given as PIP_* variables are ignored by a
    # pip too old to know them, and understood by any newer one.
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        timeout 600 python3 -m pip install --no-input --no-deps --only-binary :all: \
        --require-hashes -r "$req"
    rm -f "$req"
    # pyenv (if that is the python3 on $PATH) needs a shim for the new script.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    if ! have_cit; then
        log "command-injection-tester installed but not found on PATH" \
            "(scripts directory: $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'))"
        exit 1
    fi
fi

# ---- Exim 4.96, unpacked (see EXIM_ROOT above)

# The version the unpacked binary reports, or nothing. Debian's binary looks up its
# compiled-in user, Debian-exim, before it reads any config, so that user comes first.
exim_unpacked_version() {
    [ -x "$1/usr/sbin/exim4" ] || return 0
    "$1/usr/sbin/exim4" -C /dev/null -bV </dev/null 2>/dev/null | sed -n 's/^Exim version \([^ ]*\) .*/\1/p'
}

# The newest exim4-daemon-light apt offers for EXIM_VERSION (4.96-15+deb12uN), or nothing.
exim_deb_version() {
    apt-cache madison exim4-daemon-light 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
        grep -m1 "^$EXIM_VERSION-" || true
}

if ! id -u Debian-exim >/dev/null 2>&1; then
    log "creating the system user Debian-exim, as exim4-base's postinst would"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin Debian-exim
fi
if [ "$(exim_unpacked_version "$EXIM_ROOT")" = "$EXIM_VERSION" ]; then
    log "exim $EXIM_VERSION already unpacked in $EXIM_ROOT"
else
    deb_version=$(exim_deb_version)
    if [ -z "$deb_version" ]; then
        # Package lists missing or stale (apt was skipped above): fetch them once.
        wait_for_apt
        apt-get -o DPkg::Lock::Timeout=600 update
        deb_version=$(exim_deb_version)
    fi
    if [ -z "$deb_version" ]; then
        log "apt offers no exim4-daemon-light $EXIM_VERSION-* (Debian 12 has it)"
        exit 1
    fi
    work=$(mktemp -d)
    (cd "$work" && timeout 600 apt-get -o APT::Sandbox::User=root download "exim4-daemon-light=$deb_version")
    deb=("$work"/exim4-daemon-light_*.deb)
    if [ "$(dpkg-deb -f "${deb[0]}" Version)" != "$deb_version" ]; then
        log "downloaded ${deb[0]} is not version $deb_version"
        exit 1
    fi
    # Unpacked beside the old one and moved into place once it is known to work, so an
    # interrupted run leaves no half-unpacked Exim that looks complete.
    rm -rf "$EXIM_ROOT.new"
    mkdir -p "$EXIM_ROOT.new"
    dpkg -x "${deb[0]}" "$EXIM_ROOT.new"
    rm -rf "$work"
    missing=$(ldd "$EXIM_ROOT.new/usr/sbin/exim4" | sed -n 's/^[[:space:]]*\([^ ]*\) => not found.*/\1/p')
    if [ -n "$missing" ]; then
        log "the unpacked exim4 lacks libraries: $missing"
        exit 1
    fi
    got=$(exim_unpacked_version "$EXIM_ROOT.new")
    if [ "$got" != "$EXIM_VERSION" ]; then
        log "the unpacked exim4 reports version '$got', not $EXIM_VERSION"
        exit 1
    fi
    echo "$deb_version" >"$EXIM_ROOT.new/exim4-daemon-light.version"
    rm -rf "$EXIM_ROOT"
    mv "$EXIM_ROOT.new" "$EXIM_ROOT"
    log "unpacked exim4-daemon-light $deb_version into $EXIM_ROOT"
fi

# No systemd in the sandbox. The package scripts may or may not have started the
# system instances (policy-rc.d usually forbids it); stop them if they run so they
# don't sit on ports 25/110/143. Failures here are tolerated on purpose.
if postfix status >/dev/null 2>&1; then
    log "stopping system-wide postfix"
    postfix stop >/dev/null 2>&1 || service postfix stop >/dev/null 2>&1 || true
fi
if [ -s /run/dovecot/master.pid ] && kill -0 "$(cat /run/dovecot/master.pid)" 2>/dev/null; then
    log "stopping system-wide dovecot"
    doveadm stop >/dev/null 2>&1 || service dovecot stop >/dev/null 2>&1 || true
fi

# The packages' own imap4d/pop3d (their systemd units run `imap4d --daemon` and
# `pop3d --daemon` on 143/110 with /etc/mailutils.conf). The tests' instances always
# name a config file of their own (--config-file=...), so any imap4d or pop3d without
# one is the system's: stopped here, as postfix and dovecot above.
for d in imap4d pop3d; do
    for pid in $(pgrep -x "$d" 2>/dev/null || true); do
        if ! tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^--config-file='; then
            log "stopping system-wide $d (pid $pid)"
            systemctl stop "mailutils-$d" >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
        fi
    done
done

# The packages' own knot, unbound and nginx (started where systemd runs them) are no
# use to the tests and could hold the outbound lab's addresses with a wildcard listener
# (nginx's sites on *:443, say). The lab's own always name a config file of their own
# (-c ...), so any without one is the system's, stopped here as postfix and dovecot above.
for unit in knot:knotd unbound:unbound; do
    for pid in $(pgrep -x "${unit#*:}" 2>/dev/null || true); do
        if ! tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qx -- '-c'; then
            log "stopping system-wide ${unit#*:} (pid $pid)"
            systemctl stop "${unit%:*}" >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
        fi
    done
done
if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    log "stopping system-wide nginx"
    nginx -s stop >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
fi

# postconf -d: the compiled-in version, which needs no main.cf (a fresh install may have
# none, and then plain postconf only says "fatal: open /etc/postfix/main.cf").
log "versions: postfix $(postconf -d -h mail_version 2>/dev/null), dovecot $(dovecot --version)," \
    "exim $(exim_unpacked_version "$EXIM_ROOT") ($(cat "$EXIM_ROOT/exim4-daemon-light.version" 2>/dev/null))," \
    "mailutils $(imap4d --version 2>/dev/null | sed -n '1s/^imap4d (GNU Mailutils) //p')"
log "clients: $(curl --version | head -n1 | cut -d' ' -f1-2), $(mbsync --version), fetchmail $(fetchmail --version 2>/dev/null | sed -n 's/^This is fetchmail release \([^+ ]*\).*/\1/p')"
log "attack tools: testssl $(dpkg-query -W -f='${Version}' testssl.sh 2>/dev/null), $(gnutls-cli --version | head -n1), command-injection-tester $CIT_VERSION"
log "outbound lab: knot $(knotd --version | sed -n '1s/.*version //p'), unbound $(unbound -V | sed -n 's/^Version //p'), nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx\///')"
log "ok"
