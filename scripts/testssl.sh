#!/usr/bin/env bash
# testssl.sh (Debian package testssl.sh, command `testssl`) against every TLS listener
# of mailmoat in front of a real legacy Postfix + Dovecot (scripts/legacy.sh), with an
# ECDSA test certificate (scripts/gen-test-certs.sh), plus a renegotiation probe with a
# second TLS stack (gnutls-cli --rehandshake). Standalone and slow (about 40 s a
# listener), so not part of `cargo test`; tests/e2e_attack_tools.rs runs it for two
# listeners and in --control mode.
#
#   scripts/testssl.sh [--mailmoat BIN] [--keep] [LISTENER...]
#   scripts/testssl.sh --control [--keep]
#
# LISTENER: smtp smtps imap imaps pop3 pop3s (default: all six; smtp, imap and pop3 are
# scanned through STARTTLS/STLS with `testssl -t PROTO`, the others as implicit TLS).
# --control scans a deliberately weak `openssl s_server` instead (TLS 1.0/1.1, CBC and
# RSA key transport suites, client-initiated renegotiation allowed) and passes only if
# every planted weakness is reported: the checks below cannot pass by not looking.
#
# A listener FAILS when testssl finds SSLv2, SSLv3, TLS 1.0 or TLS 1.1 offered, TLS 1.2
# or TLS 1.3 missing, any cipher suite without forward secrecy or without AEAD (CBC,
# 3DES, RC4, NULL, export, anonymous), a client-initiated renegotiation accepted
# (testssl's check or gnutls-cli's rehandshake), or any of its vulnerability checks
# positive. Certificate trust findings are shown, not judged (a throw-away test CA).
#
# Offline: protocol probes go through testssl's own bash sockets (not --ssl-native), so
# SSLv2/SSLv3/TLS 1.0/TLS 1.1 ClientHellos really reach the listener whatever Debian's
# OpenSSL allows; `--nodns none` and no --phone-out keep it off DNS and the network.
#
# Bounded: each testssl run by TESTSSL_TIMEOUT (300 s), each probe by 10 s, and every
# process this script starts by `timeout`, so nothing outlives a killed run for long.
# Exit: 0 all passed, 1 a listener failed, 2 usage or setup error. Root (legacy.sh);
# tools from scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

PROG=testssl.sh
die() { echo "$PROG: $*" >&2; exit 2; }
note() { echo "$PROG: $*" >&2; }

ALL_LISTENERS=(smtp smtps imap imaps pop3 pop3s)
TESTSSL_TIMEOUT=${TESTSSL_TIMEOUT:-300}
PROBE_TIMEOUT=10

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

mailmoat_bin=${MAILMOAT_BIN:-}
keep=0
control=0
selected=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mailmoat) [ $# -ge 2 ] || usage; mailmoat_bin=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        --control) control=1; shift ;;
        -h|--help) usage ;;
        -*) usage ;;
        *)
            case " ${ALL_LISTENERS[*]} " in
                *" $1 "*) selected+=("$1") ;;
                *) die "unknown listener '$1' (one of: ${ALL_LISTENERS[*]})" ;;
            esac
            shift
            ;;
    esac
done
[ ${#selected[@]} -gt 0 ] || selected=("${ALL_LISTENERS[@]}")

# A missing tool is an error, never a skip.
for tool in testssl gnutls-cli openssl python3 timeout stdbuf; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/install-deps.sh as root"
done
testssl_version=$(testssl --version 2>/dev/null | sed -n 's/^ *testssl *\([0-9][^ ]*\) .*/\1/p' | head -n1)
gnutls_version=$(gnutls-cli --version 2>/dev/null | head -n1)

work=$(mktemp -d /tmp/mailmoat-testssl.XXXXXX)
chmod 0755 "$work"
pids=()
legacy_started=0
status=2
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ "$legacy_started" = 1 ]; then
        bash "$root/scripts/legacy.sh" stop "$work/legacy" >/dev/null 2>&1 || true
    fi
    if [ "$status" = 0 ] && [ "$keep" = 0 ]; then
        rm -rf "$work"
    else
        note "raw outputs (testssl text and JSON, probes, mailmoat log) kept in $work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Distinct free loopback ports, all bound at once then released.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# Everything this script starts dies by itself at the latest after this long.
lifetime=$(( ${#selected[@]} * (TESTSSL_TIMEOUT + 3 * PROBE_TIMEOUT) + 120 ))

# ---------------------------------------------------------------- analysis

# analyze NAME DESCRIPTION JSON TESTSSL_RC SECONDS REHANDSHAKE_OUT MAILMOAT_LOG
# Prints the summary of one target; exit 0 pass, 1 fail. Last line:
#   RESULT NAME: PASS     or     RESULT NAME: FAIL (check check ...)
analyze() {
    python3 - "$@" <<'PY'
import json, re, sys
from collections import Counter

name, describe, json_path, testssl_rc, seconds, rehandshake_path, mailmoat_log = sys.argv[1:8]
fails = []       # (check, detail)
lines = []       # (label, text, ok)

def fail(check, detail):
    fails.append((check, detail))

try:
    with open(json_path) as f:
        findings = json.load(f)
except (OSError, ValueError) as e:
    findings = []
    fail("scan", f"no testssl JSON ({e})")

by_id = {}
for item in findings:
    by_id.setdefault(item.get("id", ""), []).append(item)

def finding(id_):
    items = by_id.get(id_)
    if not items:
        fail("scan", f"testssl reported no '{id_}' finding")
        return None
    return items[0]

if testssl_rc in ("124", "137"):
    fail("scan", f"testssl did not finish within its time limit (exit {testssl_rc})")
for item in by_id.get("scanProblem", []):
    fail("scan", f"testssl: {item['finding']}")

# ---- protocols
PROTOCOLS = [("SSLv2", "SSLv2"), ("SSLv3", "SSLv3"), ("TLS1", "TLSv1.0"),
             ("TLS1_1", "TLSv1.1"), ("TLS1_2", "TLSv1.2"), ("TLS1_3", "TLSv1.3")]
offered, not_offered = [], []
for id_, label in PROTOCOLS:
    item = finding(id_)
    if item is None:
        continue
    text = item["finding"]
    if text.startswith("not offered"):
        not_offered.append(label)
    elif text.startswith("offered"):
        offered.append(label)
    else:
        fail("protocols", f"{label}: testssl could not tell ({text})")
ok = offered == ["TLSv1.2", "TLSv1.3"] and len(not_offered) == 4
if not ok:
    fail("protocols", "offered: " + (" ".join(offered) or "none") + " (must be exactly TLSv1.2 TLSv1.3)")
lines.append(("protocols", "offered: " + " ".join(offered) + " | not offered: " + " ".join(not_offered), ok))

# ---- every cipher suite, per protocol (-E)
AEAD = {"AESGCM", "ChaCha20", "AESCCM", "AESCCM8", "ARIAGCM", "CamelliaGCM"}
per_proto = {}
bad_protos = set()
cipher_ok = True
for id_, items in by_id.items():
    if not id_.startswith("cipher-"):
        continue
    for item in items:
        cols = re.split(r"\s{2,}", item["finding"].strip())
        if len(cols) < 7 or not cols[5].isdigit():
            fail("ciphers", f"unparsable testssl cipher line: {item['finding']!r}")
            cipher_ok = False
            continue
        proto, _hexcode, ossl, kx, enc, bits, iana = cols[:7]
        per_proto.setdefault(proto, []).append(ossl)
        problems = []
        if proto not in ("TLS 1.2", "TLS 1.3"):
            problems.append(f"offered with {proto}")
        tls13 = iana.startswith(("TLS_AES_", "TLS_CHACHA20_", "TLS_SM4_"))
        if not (tls13 or "_ECDHE_" in iana or "_DHE_" in iana):
            problems.append(f"no forward secrecy (key exchange {kx})")
        if enc not in AEAD or int(bits) < 128:
            problems.append(f"not AEAD ({enc} {bits})")
        if problems:
            cipher_ok = False
            bad_protos.add(proto)
            fail("ciphers", f"{proto} {ossl}: " + ", ".join(problems))
for proto in ("TLS 1.2", "TLS 1.3"):
    if not per_proto.get(proto):
        cipher_ok = False
        fail("ciphers", f"no {proto} cipher suite found (did the per-protocol scan run?)")
for proto in ["SSLv3", "TLS 1", "TLS 1.1", "TLS 1.2", "TLS 1.3"]:
    if per_proto.get(proto):
        lines.append((f"{proto} ciphers", " ".join(per_proto[proto]), proto not in bad_protos))

# ---- cipher classes (-s) and forward secrecy (-f)
CLASSES = [("cipherlist_NULL", "NULL"), ("cipherlist_aNULL", "aNULL"),
           ("cipherlist_EXPORT", "EXPORT"), ("cipherlist_LOW", "LOW"),
           ("cipherlist_3DES_IDEA", "3DES/IDEA"), ("cipherlist_AVERAGE", "CBC")]
absent, present = [], []
for id_, label in CLASSES:
    item = finding(id_)
    if item is None:
        continue
    if item["finding"].startswith("not offered"):
        absent.append(label)
    else:
        present.append(label)
        fail("cipher classes", f"{label}: {item['finding']}")
strong = finding("cipherlist_STRONG")
if strong is not None and not strong["finding"].startswith("offered"):
    fail("cipher classes", f"AEAD: {strong['finding']}")
lines.append(("cipher classes", " ".join(absent) + ": not offered"
              + (" | offered: " + " ".join(present) if present else "")
              + " | AEAD: " + (strong["finding"] if strong else "?"), not present))
pfs = finding("PFS")
curves = (by_id.get("PFS_ECDHE_curves") or [{"finding": "?"}])[0]["finding"]
pfs_ok = pfs is not None and pfs["finding"].startswith("offered")
if pfs is not None and not pfs_ok:
    fail("forward secrecy", pfs["finding"])
lines.append(("forward secrecy", (pfs["finding"] if pfs else "?") + "; curves " + curves, pfs_ok))

# ---- renegotiation: testssl (openssl s_client, "R") and gnutls-cli --rehandshake
try:
    probe = open(rehandshake_path, errors="replace").read()
except OSError:
    probe = ""
alert = re.search(r"^\*\*\* Received alert \[\d+\]: (.*)$", probe, re.M)
fatal = re.search(r"^\*\*\* Fatal error: (.*)$", probe, re.M)
if "- ReHandshake was completed" in probe:
    probe_ok, text = False, "PERFORMED: the server renegotiated"
    fail("rehandshake", "gnutls-cli completed a second handshake on the same connection")
elif "*** ReHandshake has failed" in probe:
    probe_ok = True
    text = "refused (" + (alert.group(1) if alert else fatal.group(1) if fatal else "failed") + ")"
elif "- Handshake was completed" in probe:
    probe_ok = True
    text = "not performed: no answer to the renegotiation ClientHello within the probe's time"
else:
    probe_ok, text = False, "probe failed: no TLS 1.2 handshake"
    fail("rehandshake", "gnutls-cli could not complete the first TLS 1.2 handshake")

BAD = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
reneg = finding("secure_renego")
client = finding("secure_client_renego")
client_text = client["finding"] if client else "?"
reneg_ok = True
if reneg is not None and reneg["severity"] in BAD:
    reneg_ok = False
    fail("renegotiation", f"RFC 5746: {reneg['finding']}")
if client is not None and (client["severity"] in BAD or "VULNERABLE" in client_text):
    reneg_ok = False
    fail("renegotiation", f"client-initiated renegotiation: {client_text}")
elif "not vulnerable" not in client_text:
    # testssl's own check did not conclude (its s_client killed by its timeout, say):
    # then the gnutls-cli probe alone must show that no renegotiation took place.
    client_text += " (inconclusive)"
    if not probe_ok:
        reneg_ok = False
        fail("renegotiation", f"testssl inconclusive ({client['finding'] if client else 'no finding'}) and no conclusive probe")
lines.append(("renegotiation", "RFC 5746 extension: " + (reneg["finding"] if reneg else "?")
              + " | client-initiated (testssl): " + client_text, reneg_ok))
lines.append(("rehandshake", "gnutls-cli --rehandshake over TLS 1.2: " + text, probe_ok))

# ---- vulnerability checks (-U)
VULNS = ["heartbleed", "CCS", "ticketbleed", "ROBOT", "CRIME_TLS", "BREACH", "POODLE_SSL",
         "fallback_SCSV", "SWEET32", "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13", "RC4"]
REQUIRED_VULNS = ["heartbleed", "CCS", "ROBOT", "CRIME_TLS", "POODLE_SSL", "fallback_SCSV",
                  "SWEET32", "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13", "RC4"]
vuln_ok = True
checked = []
for id_ in VULNS:
    items = by_id.get(id_)
    if not items:
        if id_ in REQUIRED_VULNS:
            vuln_ok = False
            fail("vulnerabilities", f"testssl reported no '{id_}' finding")
        continue
    checked.append(id_)
    item = items[0]
    if item["severity"] in BAD or "VULNERABLE" in item["finding"]:
        vuln_ok = False
        fail("vulnerabilities", f"{id_}: {item['severity']} {item['finding']}")
# Anything else testssl rates LOW or worse, outside the certificate and what is judged above.
judged = {i for i, _ in PROTOCOLS} | {i for i, _ in CLASSES} | set(VULNS) | {
    "cipherlist_STRONG", "PFS", "secure_renego", "secure_client_renego"}
for id_, items in by_id.items():
    if id_ in judged or id_.startswith("cert") or id_.startswith("cipher-"):
        continue
    for item in items:
        if item["severity"] in BAD:
            vuln_ok = False
            fail("vulnerabilities", f"{id_}: {item['severity']} {item['finding']}")
lines.append(("vulnerabilities", " ".join(checked) + ": " + ("not vulnerable" if vuln_ok else "see FAIL lines"), vuln_ok))

sig = (by_id.get("cert_signatureAlgorithm") or [{"finding": "?"}])[0]["finding"]
key = (by_id.get("cert_keySize") or [{"finding": "?"}])[0]["finding"]
lines.append(("certificate", f"{sig}, {key} (test CA: trust and expiry not judged)", None))

# ---- what the listener itself saw (mailmoat's log), as evidence the probes arrived
if mailmoat_log != "-":
    refused, norenego = Counter(), 0
    marker = f" listener={name} "
    try:
        for line in open(mailmoat_log, errors="replace"):
            if marker not in line:
                continue
            if 'event="tls_handshake_failed"' in line:
                m = re.search(r" err=(.*)$", line.rstrip())
                # One bucket for all the ALPN ids testssl tries (ALPACA refusals).
                refused[re.sub(r"\[.*\]", "[...]", m.group(1)) if m else "?"] += 1
            if "Sending warning alert NoRenegotiation" in line:
                norenego += 1
    except OSError:
        pass
    text = f"{sum(refused.values())} handshakes refused"
    if refused:
        text += ": " + ", ".join(f"{err} x{n}" for err, n in refused.most_common())
    text += f"; no_renegotiation alerts queued by rustls: {norenego}"
    lines.append(("mailmoat", text, None))

print(f"== {name}: {describe}, testssl {seconds} s")
for label, text, ok in lines:
    mark = "" if ok is None else ("   ok" if ok else "   FAIL")
    print(f"   {label:<16}{text}{mark}")
for check, detail in fails:
    print(f"   FAIL {check}: {detail}")
checks = sorted({c for c, _ in fails})
print(f"RESULT {name}: " + ("PASS" if not fails else "FAIL (" + " ".join(checks) + ")"))
sys.exit(1 if fails else 0)
PY
}

# scan NAME DESCRIPTION PORT STARTTLS_PROTO(or -) MAILMOAT_LOG(or -)
scan() {
    local name=$1 describe=$2 port=$3 proto=$4 mlog=$5 rc start seconds
    local args=(--quiet --color 0 --warnings off --nodns none
        --connect-timeout 10 --openssl-timeout 10
        -p -s -f -S -U -E
        --jsonfile "$work/$name.json" --logfile "$work/$name.txt")
    [ "$proto" != - ] && args+=(-t "$proto")
    note "scanning $name ($describe) with testssl $testssl_version ..."
    start=$SECONDS
    rc=0
    (cd "$work" && timeout -k 10 "$TESTSSL_TIMEOUT" testssl "${args[@]}" "127.0.0.1:$port" \
        </dev/null >"$work/$name.stdout" 2>&1) || rc=$?
    seconds=$((SECONDS - start))

    # A renegotiation attempt from a second TLS stack, forced to TLS 1.2 (TLS 1.3 has
    # no renegotiation). stdbuf: the transcript survives the timeout.
    local gargs=(--insecure --rehandshake --priority 'NORMAL:-VERS-TLS1.3' -p "$port")
    [ "$proto" != - ] && gargs+=(--starttls-proto="$proto")
    timeout -k 2 "$PROBE_TIMEOUT" stdbuf -o0 -e0 gnutls-cli "${gargs[@]}" 127.0.0.1 \
        </dev/null >"$work/$name.rehandshake" 2>&1 || true

    analyze "$name" "$describe" "$work/$name.json" "$rc" "$seconds" \
        "$work/$name.rehandshake" "$mlog" | tee "$work/$name.summary"
    return "${PIPESTATUS[0]}"
}

# ---------------------------------------------------------------- control mode

if [ "$control" = 1 ]; then
    read -r port < <(free_ports 1)
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/weak.key" -out "$work/weak.pem" \
        -days 2 -subj /CN=weak.example.test 2>/dev/null
    # SECLEVEL=0 and -min_protocol override Debian's openssl.cnf (TLS 1.2, SECLEVEL=2);
    # -client_renegotiation undoes OpenSSL 3's refusal of client renegotiation.
    timeout "$lifetime" openssl s_server -accept "127.0.0.1:$port" -cert "$work/weak.pem" \
        -key "$work/weak.key" -cipher 'DEFAULT:@SECLEVEL=0' -min_protocol TLSv1 \
        -client_renegotiation -www -quiet </dev/null >"$work/s_server.log" 2>&1 &
    pids+=($!)
    wait_port "$port" || die "openssl s_server did not listen on 127.0.0.1:$port"
    result=0
    scan weak "openssl s_server, TLS 1.0-1.3, SECLEVEL=0, client renegotiation (planted weaknesses)" \
        "$port" - - || result=$?
    echo
    missing=()
    for check in protocols ciphers renegotiation rehandshake; do
        grep -q "^   FAIL $check:" "$work/weak.summary" || missing+=("$check")
    done
    if [ "$result" = 1 ] && [ ${#missing[@]} -eq 0 ]; then
        echo "control: every planted weakness was reported (protocols ciphers renegotiation rehandshake)"
        status=0
    else
        echo "control: NOT DETECTED: ${missing[*]:-(analysis exit $result)}"
        status=1
    fi
    exit "$status"
fi

# ---------------------------------------------------------------- mailmoat

[ "$(id -u)" -eq 0 ] || die "must run as root (scripts/legacy.sh runs private Postfix/Dovecot instances)"
if [ -z "$mailmoat_bin" ]; then
    note "building mailmoat (cargo build)"
    cargo build --quiet
    mailmoat_bin=$root/target/debug/mailmoat
fi
[ -x "$mailmoat_bin" ] || die "no mailmoat binary at $mailmoat_bin"

read -r smtp_up imap_up pop3_up p_smtp p_smtps p_imap p_imaps p_pop3 p_pop3s < <(free_ports 9)

note "starting the legacy Postfix + Dovecot (scripts/legacy.sh)"
legacy_started=1
LEGACY_SMTP_PORT=$smtp_up LEGACY_IMAP_PORT=$imap_up LEGACY_POP3_PORT=$pop3_up \
    bash "$root/scripts/legacy.sh" start "$work/legacy" --watch $$ >"$work/legacy-start.log" 2>&1 ||
    { cat "$work/legacy-start.log" >&2; die "scripts/legacy.sh start failed"; }

bash "$root/scripts/gen-test-certs.sh" "$work/certs" mail.example.test >/dev/null
cat >"$work/mailmoat.yaml" <<YAML
tls:
  certificates:
    - { cert: $work/certs/mail.example.test.pem, key: $work/certs/mail.example.test.key }
log: { level: info }
listeners:
  - { name: smtp,  protocol: smtp, listen: "127.0.0.1:$p_smtp",  tls: starttls, policy: require_tls, upstream: "127.0.0.1:$smtp_up" }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:$p_smtps", tls: implicit, upstream: "127.0.0.1:$smtp_up" }
  - { name: imap,  protocol: imap, listen: "127.0.0.1:$p_imap",  tls: starttls, upstream: "127.0.0.1:$imap_up" }
  - { name: imaps, protocol: imap, listen: "127.0.0.1:$p_imaps", tls: implicit, upstream: "127.0.0.1:$imap_up" }
  - { name: pop3,  protocol: pop3, listen: "127.0.0.1:$p_pop3",  tls: starttls, upstream: "127.0.0.1:$pop3_up" }
  - { name: pop3s, protocol: pop3, listen: "127.0.0.1:$p_pop3s", tls: implicit, upstream: "127.0.0.1:$pop3_up" }
YAML
"$mailmoat_bin" check -c "$work/mailmoat.yaml" >/dev/null
env -u RUST_LOG timeout "$lifetime" "$mailmoat_bin" run -c "$work/mailmoat.yaml" \
    </dev/null >"$work/mailmoat.log" 2>&1 &
pids+=($!)
for port in "$p_smtp" "$p_smtps" "$p_imap" "$p_imaps" "$p_pop3" "$p_pop3s"; do
    wait_port "$port" || { cat "$work/mailmoat.log" >&2; die "mailmoat did not listen on $port"; }
done

echo "testssl $testssl_version ($(command -v testssl)), $gnutls_version, $(openssl version)"
echo "mailmoat $mailmoat_bin in front of the legacy Postfix/Dovecot; ECDSA P-256 test certificate"
echo
passed=0
failed=()
for name in "${selected[@]}"; do
    case "$name" in
        smtp) port=$p_smtp proto=smtp describe="SMTP STARTTLS" ;;
        smtps) port=$p_smtps proto=- describe="SMTP implicit TLS" ;;
        imap) port=$p_imap proto=imap describe="IMAP STARTTLS" ;;
        imaps) port=$p_imaps proto=- describe="IMAP implicit TLS" ;;
        pop3) port=$p_pop3 proto=pop3 describe="POP3 STLS" ;;
        pop3s) port=$p_pop3s proto=- describe="POP3 implicit TLS" ;;
    esac
    if scan "$name" "$describe on 127.0.0.1:$port" "$port" "$proto" "$work/mailmoat.log"; then
        passed=$((passed + 1))
    else
        failed+=("$name")
    fi
    echo
done

echo "testssl: ${#selected[@]} listeners, $passed passed, ${#failed[@]} failed${failed:+ (${failed[*]})}"
if [ ${#failed[@]} -eq 0 ]; then status=0; else status=1; fi
exit "$status"
