#!/usr/bin/env python3
"""Writes the seed corpora under tests/fuzz/seeds/<target>/ (run from anywhere).

Each seed is a realistic dialogue in the byte format the target reads: see
tests/fuzz/src/session_script.rs (sessions) and tests/fuzz/src/framing.rs (framers).
scripts/fuzz.sh copies these into the (git-ignored) corpus before fuzzing.
"""

import hashlib
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Flags (byte 0 of a session script).
IMPLICIT_TLS = 1
AUTH_REQUIRES_TLS = 2
REJECT_BARE = 4
LONG_LINES = 8
SMALL_HELD = 16
PLAINTEXT_1 = 1 << 5
PLAINTEXT_3 = 2 << 5
LITERAL_16 = 128


def _data(narrow, wide, payload):
    out = bytearray()
    while True:
        chunk, payload = payload[:65535], payload[65535:]
        if len(chunk) <= 255:
            out += bytes([narrow, len(chunk)]) + chunk
        else:
            out += bytes([wide]) + struct.pack("<H", len(chunk)) + chunk
        if not payload:
            return bytes(out)


def C(text):
    return _data(0, 15, text.encode("latin-1") if isinstance(text, str) else text)


def U(text):
    return _data(5, 9, text.encode("latin-1") if isinstance(text, str) else text)


TLS = bytes([10])
CLIENT_EOF = bytes([12])
UPSTREAM_EOF = bytes([13])
TIMEOUT = bytes([14])


def script(flags, *ops):
    return bytes([flags]) + b"".join(ops)


def pieces(data, size):
    """The framers' format: a length byte, then that many bytes."""
    out = bytearray()
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        out += bytes([len(chunk)]) + chunk
    return bytes(out)


EHLO_REPLY = (
    "250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-STARTTLS\r\n"
    "250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n250-XCLIENT NAME ADDR\r\n250-ENHANCEDSTATUSCODES\r\n"
    "250-8BITMIME\r\n250 CHUNKING\r\n"
)
PLAIN_IR = "AGFsaWNlAHNlY3JldA=="  # \0alice\0secret

SMTP = {
    "full_submission": script(
        0,
        U("220 legacy.example.test ESMTP\r\n"),
        C("EHLO client.example\r\n"),
        U(EHLO_REPLY),
        C("STARTTLS\r\n"),
        U("250 2.0.0 Ok\r\n"),
        TLS,
        C("EHLO client.example\r\n"),
        U(EHLO_REPLY),
        C(f"AUTH PLAIN {PLAIN_IR}\r\n"),
        U("235 2.7.0 Authentication successful\r\n"),
        C("MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"),
        U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"),
        C("Subject: hi\r\n\r\nhello\r\n..dot\r\n.\r\nQUIT\r\n"),
        U("250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"),
        UPSTREAM_EOF,
    ),
    "plaintext_refusals": script(
        0,
        U("220 legacy ESMTP\r\n"),
        C("EHLO c\r\n"),
        U("250-legacy\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"),
        C(f"AUTH PLAIN {PLAIN_IR}\r\nMAIL FROM:<a@b>\r\nXCLIENT ADDR=1.2.3.4\r\nSTARTTLX\r\nNOOP\r\n"),
        U("250 ok\r\n"),
        C("BDAT 5 LAST\r\nabcdeRSET\r\n"),
        U("250 ok\r\n"),
        C("QUIT\r\n"),
        U("221 bye\r\n"),
    ),
    "starttls_injection": script(
        0,
        U("220 legacy ESMTP\r\n"),
        C("EHLO c\r\n"),
        U("250 legacy\r\n"),
        C(f"STARTTLS\r\nAUTH PLAIN {PLAIN_IR}\r\n"),
        U("250 2.0.0 Ok\r\n"),
        C("\x16\x03\x01\x00\x05hello"),
        TLS,
        U("250 stray\r\n"),
        C("MAIL FROM:<a@b>\r\n"),
        TIMEOUT,
    ),
    "helo_only_upstream": script(
        0,
        U("220 old\r\n"),
        C("EHLO c.example\r\n"),
        U("502 5.5.2 Error: command not recognized\r\n"),
        U("250 old.example\r\n"),
        C("STARTTLS\r\n"),
        U("554 no\r\n"),
        C("STARTTLS extra\r\nSTARTTLS\r\n"),
        U("250 ok\r\n"),
        TLS,
        C("HELO c\r\nMAIL FROM:<a@b>\r\n"),
        U("250 old\r\n250 ok\r\n"),
        CLIENT_EOF,
    ),
    "bdat_after_tls": script(
        IMPLICIT_TLS,
        U("220 legacy ESMTP\r\n"),
        C("EHLO c\r\n"),
        U("250-legacy\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH=PLAIN LOGIN\r\n"),
        C("AUTH LOGIN\r\n"),
        U("334 VXNlcm5hbWU6\r\n"),
        C("YWxpY2U=\r\n"),
        U("334 UGFzc3dvcmQ6\r\n"),
        C("c2VjcmV0\r\n"),
        U("235 ok\r\n"),
        C("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 10\r\n0123456789BDAT 3 LAST\r\nabc"),
        U("250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n"),
        C("BDAT 99999999999\r\n"),
    ),
    "mx_smuggling": script(
        AUTH_REQUIRES_TLS,
        U("220 mx ESMTP\r\n"),
        C("HELO c\r\n"),
        U("250 mx\r\n"),
        C("MAIL FROM:<a@b>\r\n"),
        U("250 ok\r\n"),
        C("RCPT TO:<c@d>\r\n"),
        U("250 ok\r\n"),
        C("DATA\r\n"),
        U("354 go\r\n"),
        C("a\n.\nMAIL FROM:<x>\r\nb\r.\rc\r\n.\nd\r\n.\r\n"),
        U("250 queued\r\n"),
        C("VRFY x\r\nEXPN y\r\nHELP\r\nETRN z\r\nFOO\r\n"),
        U("252 x\r\n502 y\r\n214 z\r\n250 w\r\n"),
    ),
    "mx_reject_bare": script(
        AUTH_REQUIRES_TLS | REJECT_BARE,
        U("220 mx ESMTP\r\n"),
        C("EHLO c\r\n"),
        U("250-mx\r\n250 PIPELINING\r\n"),
        C("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
        U("250 ok\r\n250 ok\r\n354 go\r\n"),
        C("line\nbare\r\n.\r\n"),
    ),
    "broken_upstream": script(
        0,
        U("220-multi\r\n221 changed\r\n"),
        C("EHLO c\r\n"),
        U("garbage\r\n"),
    ),
    "long_line": script(
        SMALL_HELD,
        U("220 legacy\r\n"),
        C("NOOP " + "x" * 600 + "\r\n"),
    ),
    "half_close": script(
        0,
        U("220 legacy\r\n"),
        C("EHLO c\r\n"),
        CLIENT_EOF,
        U("250 legacy\r\n"),
        UPSTREAM_EOF,
    ),
}

IMAP_GREETING = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN LOGINDISABLED] ready\r\n"
IMAP = {
    "starttls_login_relay": script(
        0,
        U(IMAP_GREETING),
        C("a CAPABILITY\r\n"),
        U("* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN LOGINDISABLED\r\na OK done\r\n"),
        C("b STARTTLS\r\n"),
        TLS,
        C("c CAPABILITY\r\n"),
        U("* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=SCRAM-SHA-256-PLUS LITERAL+\r\nc OK done\r\n"),
        C("d LOGIN alice secret\r\ne SELECT INBOX\r\n"),
        U("d OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\n"),
    ),
    "plaintext_refusals": script(
        0,
        U("* OK ready\r\n"),
        C('a LOGIN alice "secret"\r\nb AUTHENTICATE PLAIN ' + PLAIN_IR + "\r\nc ID (\"name\" \"x\")\r\n"),
        C("d LOGIN {5+}\r\nalice {6}\r\n"),
        C("e SELECT INBOX\r\nf XXXXXXXX\r\n\r\n* BAD\r\ng\r\n"),
        C("h NOOP {3}\r\n"),
        U("+ go\r\n"),
        C("abc\r\n"),
        U("h OK noop\r\n"),
        C("i LOGOUT\r\n"),
        U("* BYE bye\r\ni OK done\r\n"),
    ),
    "literals_after_tls": script(
        IMPLICIT_TLS,
        U(IMAP_GREETING),
        C("a LOGIN {5}\r\n"),
        U("+ ready\r\n"),
        C("alice {6}\r\n"),
        U("+ ready\r\n"),
        C("secret\r\n"),
        U("a NO [AUTHENTICATIONFAILED] no\r\n"),
        C("b ID (\"name\" {4+}\r\nmutt)\r\n"),
        U("* ID (\"name\" {7}\r\nDovecot)\r\nb OK ID\r\n"),
        C("c LOGIN alice {99999999}\r\n"),
        C("d AUTHENTICATE PLAIN\r\n"),
        U("+ \r\n"),
        C(PLAIN_IR + "\r\n"),
        U("d OK logged in\r\n"),
    ),
    "starttls_injection": script(
        0,
        U(IMAP_GREETING),
        C("a STARTTLS\r\nb LOGIN alice secret\r\n"),
        U("* stray\r\n"),
        TLS,
        C("c STARTTLS\r\nd STARTTLS x\r\n"),
        TIMEOUT,
    ),
    "preauth": script(0, U("* PREAUTH hi\r\n"), C("a NOOP\r\n")),
    "bye_greeting": script(0, U("* BYE busy\r\n")),
    "tagged_greeting": script(0, U("a OK hi\r\n")),
    "small_literal_limit": script(
        LITERAL_16 | IMPLICIT_TLS,
        U("* OK [CAPABILITY IMAP4rev1 LITERAL-] hi\r\n"),
        C("a LOGIN {17}\r\n"),
        C("b LOGIN {5000+}\r\n"),
        C("c LOGIN {3+}\r\nabc {4}\r\n"),
        U("+ ok\r\n"),
        C("defg\r\n"),
        U("c NO bad\r\n"),
        UPSTREAM_EOF,
    ),
    "plaintext_budget": script(
        PLAINTEXT_3,
        U("* OK hi\r\n"),
        C("a NOOP\r\n"),
        U("a OK\r\n"),
        C("b NOOP\r\n"),
        U("b OK\r\n"),
        C("c NOOP\r\nd NOOP\r\n"),
        U("c OK\r\n"),
    ),
}

POP3 = {
    "stls_login_relay": script(
        0,
        U("+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"),
        C("CAPA\r\n"),
        U("+OK\r\nTOP\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256-PLUS\r\nSTLS\r\nXCLIENT\r\nUIDL\r\n.\r\n"),
        C("STLS\r\n"),
        TLS,
        C("CAPA\r\n"),
        U("+OK\r\nTOP\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256-PLUS\r\nSTLS\r\n.\r\n"),
        C("USER alice\r\n"),
        U("+OK\r\n"),
        C("PASS secret with spaces \r\nSTAT\r\n"),
        U("+OK logged in\r\n+OK 2 320\r\n"),
    ),
    "plaintext_refusals": script(
        0,
        U("+OK ready\r\n"),
        C("USER alice\r\nPASS secret\r\nAPOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
        C(f"AUTH PLAIN {PLAIN_IR}\r\nAUTH LOGIN YWxpY2U=\r\nAUTH\r\nSTAT\r\nSTLX\r\n\r\n"),
        C("NOOP\r\n"),
        U("+OK\r\n"),
        C("CAPA\r\n"),
        U("-ERR unknown\r\n"),
        C("QUIT\r\n"),
        U("+OK bye\r\n"),
    ),
    "bodies_after_tls": script(
        IMPLICIT_TLS,
        U("+OK ready\r\n"),
        C("AUTH PLAIN\r\n"),
        U("+ \r\n"),
        C(PLAIN_IR + "\r\n"),
        U("-ERR no\r\n"),
        C("AUTH\r\n"),
        U("+OK\r\nPLAIN\r\nSCRAM-SHA-1-PLUS\r\n.\r\n"),
        C("LIST\r\n"),
        U("+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
        C("RETR 1\r\n"),
        U("+OK 120 octets\r\nSubject: x\r\n\r\n..stuffed\n+OK inside\r\n.\r\n"),
        C("TOP 1 0\r\nUIDL 1\r\nXCLIENT ADDR=1.2.3.4\r\n"),
        U("+OK\r\nSubject: x\r\n.\r\n+OK 1 abc\r\n"),
        C("APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
        U("+OK maildrop locked\r\n"),
    ),
    "stls_injection": script(
        0,
        U("+OK ready\r\n"),
        C("STLS\r\nUSER alice\r\n"),
        U("+OK stray\r\n"),
        TLS,
        C("STLS\r\nSTLS x\r\nNOOP\r\n"),
        U("+OK\r\n"),
        TIMEOUT,
    ),
    "broken_upstream": script(
        0,
        U("+OK hi\r\n"),
        C("CAPA\r\n"),
        U("+OK\r\n" + "X" * 9000 + "\r\n"),
    ),
    "err_greeting": script(0, U("-ERR go away\r\n")),
    "plaintext_budget": script(
        PLAINTEXT_1,
        U("+OK hi\r\n"),
        C("NOOP\r\n"),
        U("+OK\r\n"),
        C("NOOP\r\n"),
    ),
}

FRAMER_STREAM = b"EHLO a\r\nNOOP\nRSET\r\n\r\n\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nQUIT\r"
LINE_FRAMER = {
    "mixed_1": bytes([15]) + pieces(FRAMER_STREAM, 1),
    "mixed_7": bytes([15]) + pieces(FRAMER_STREAM, 7),
    "mixed_whole": bytes([63]) + pieces(FRAMER_STREAM, 255),
    "cap_exact": bytes([5]) + pieces(b"NOOP\r\nNOOPS\r\n", 3),
    "too_long_then_more": bytes([3]) + pieces(b"abcdefgh\nab\n", 4),
}

BODY_STREAM = b"Subject: x\r\n\r\nhello\r\n..\r\n.x\r\na\n.\nMAIL FROM:<x>\r\nb\r.\rc\r\n.\nd\n.\r\ne\r\r\n.\r\nQUIT\r\n"
SMTP_BODY = {
    "message_1": pieces(BODY_STREAM, 1),
    "message_5": pieces(BODY_STREAM, 5),
    "message_whole": pieces(BODY_STREAM, 255),
    "empty_message": pieces(b".\r\nRSET\r\n", 2),
    "smuggling": pieces(b"a\r\n.\rMAIL\r\n\n.\r\n\r\n.\r\n", 3),
}

# mta_sts_policy: the whole input is a policy body; its lines are also TXT strings.
MTA_STS_POLICY = {
    # RFC 8461 §3.2's example, with its mixed line ends.
    "rfc8461_example": b"version: STSv1\r\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\n"
    b"mx: backupmx.example.com\nmax_age: 604800\n",
    "testing_crlf": b"version: STSv1\r\nmode: testing\r\nmx: mx1.example.org\r\nmax_age: 86400\r\n",
    "none_no_mx": b"version: STSv1\nmode: none\nmax_age: 0",
    "extensions": b"max_age:31557600\nfuture_key: some value \xc3\xa9\nmode:\tenforce \nmx:*.MX.example\n"
    b"version:STSv1\n\n",
    "duplicate_mode": b"version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n",
    "bad_max_age": b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999999\n",
    # RFC 8461 §3.1's example record, beside other TXT strings and near misses.
    "txt_records": b"v=spf1 -all\nv=STSv1; id=20160831085700Z;\nv=STSv10; id=x\n example.com.\n",
    "txt_two_records": b"v=STSv1; id=a\nv=STSv1 ;id=b; ext=1\n",
    "txt_malformed": b"v=STSv1; id=a;; x=y=z\nv=STSv1;\x00\n",
}

# The outbound relay (tests/fuzz/src/outbound_script.rs): its own op codes.
SMALL_MESSAGES = 4


def OC(text):
    """Bytes from the legacy MTA."""
    return _data(0, 15, text.encode("latin-1") if isinstance(text, str) else text)


def OM(text):
    """Bytes from the MX."""
    return _data(4, 7, text.encode("latin-1") if isinstance(text, str) else text)


REQUIRED, OPPORTUNISTIC, PLAINTEXT = 0, 1, 2


def CONNECTED(requirement):
    return bytes([8, requirement])


MX_UNAVAILABLE = bytes([9])
MX_TLS_OK = bytes([10])
MX_TLS_FAILED = bytes([11])
O_CLIENT_EOF = bytes([12])
MX_EOF = bytes([13])
O_TIMEOUT = bytes([14])
SHUTDOWN = bytes([16])

MX_EHLO = (
    "250-mx1.example.org\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-STARTTLS\r\n"
    "250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
)
MX_EHLO_TLS = "250-mx1.example.org\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250 DSN\r\n"

OUTBOUND = {
    "delivery_starttls": script(
        0,
        OC("EHLO legacy.example.com\r\n"),
        OC("MAIL FROM:<a@legacy.example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.org> NOTIFY=FAILURE\r\n"),
        CONNECTED(REQUIRED),
        OM("220 mx1.example.org ESMTP\r\n"),
        OM(MX_EHLO),
        OM("220 2.0.0 Ready\r\n"),
        MX_TLS_OK,
        OM(MX_EHLO_TLS),
        OM("250 2.1.0 Ok\r\n"),
        OM("250 2.1.5 Ok\r\n"),
        OC("RCPT TO:<c@example.org>\r\nDATA\r\n"),
        OM("550 5.1.1 No such user\r\n"),
        OM("354 go\r\n"),
        OC("Subject: x\r\n\r\nline\nbare\r\n.\nMAIL FROM:<evil@x>\r\n\0.\r\n.\r\nQUIT\r\n"),
        OM("250 2.0.0 Ok: queued\r\n"),
    ),
    "next_mx_then_unavailable": script(
        0,
        OC("EHLO legacy.example.com\r\nMAIL FROM:<a@legacy.example.com>\r\nRCPT TO:<b@example.org>\r\n"),
        CONNECTED(REQUIRED),
        OM("220 mx9 ESMTP\r\n"),
        OM("250-mx9\r\n250 SIZE 1000\r\n"),
        CONNECTED(REQUIRED),
        OM("554 5.3.2 No service\r\n"),
        CONNECTED(OPPORTUNISTIC),
        OM("220 mx ESMTP\r\n"),
        OM("502 5.5.2 EHLO?\r\n"),
        OM("250 mx\r\n"),
        MX_EOF,
        MX_UNAVAILABLE,
        OC("RCPT TO:<c@example.org>\r\nRCPT TO:<d@example.net>\r\nDATA\r\nRSET\r\n"),
        OC("MAIL FROM:<a@legacy.example.com>\r\nRCPT TO:<d@example.net>\r\n"),
        O_TIMEOUT,
        OC("QUIT\r\n"),
    ),
    "plaintext_retry_two_domains": script(
        0,
        OC("EHLO legacy.example.com\r\nMAIL FROM:<a@legacy.example.com>\r\n"
           "RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"),
        CONNECTED(OPPORTUNISTIC),
        OM("220 mx ESMTP\r\n"),
        OM(MX_EHLO),
        OM("454 4.7.0 TLS not available\r\n"),
        CONNECTED(OPPORTUNISTIC),
        OM("220 mx ESMTP\r\n"),
        OM(MX_EHLO),
        OM("220 go\r\n"),
        MX_TLS_FAILED,
        CONNECTED(PLAINTEXT),
        OM("220 mx ESMTP\r\n"),
        OM(MX_EHLO),
        OM("250 ok\r\n"),
        OM("250 ok\r\n"),
        OM("354 go\r\n"),
        OC("hi\r\n.\r\n"),
        OM("250 queued\r\n"),
        O_CLIENT_EOF,
    ),
    "size_limit": script(
        SMALL_MESSAGES,
        OC("EHLO legacy.example.com\r\nMAIL FROM:<a@legacy.example.com> SIZE=65\r\n"
           "MAIL FROM:<a@legacy.example.com> SIZE=60\r\nRCPT TO:<b@example.org>\r\n"),
        CONNECTED(OPPORTUNISTIC),
        OM("220 mx ESMTP\r\n"),
        OM("250-mx\r\n250 SIZE 100\r\n"),
        OM("250 ok\r\n"),
        OM("250 ok\r\n"),
        OC("DATA\r\n"),
        OM("354 go\r\n"),
        OC("0123456789" * 8 + "\r\n.\r\nNOOP\r\n"),
        SHUTDOWN,
    ),
    "broken_mx": script(
        0,
        OC("EHLO legacy.example.com\r\nMAIL FROM:<a@legacy.example.com>\r\nRCPT TO:<b@example.org>\r\n"),
        CONNECTED(PLAINTEXT),
        OM("220-mx\r\n221 changed\r\n"),
        CONNECTED(PLAINTEXT),
        OM("220 mx\r\n"),
        OM("250 mx\r\n"),
        OM("250 ok\r\n"),
        OM("250 ok\r\n"),
        OM("421 idle\r\n"),
        OC("RCPT TO:<c@example.org>\r\nDATA\r\nRSET\r\nMAIL FROM:<a@legacy.example.com>\r\nRCPT TO:<b@example.org>\r\n"),
        CONNECTED(PLAINTEXT),
        OM("220 mx\r\n"),
        OM("250 mx\r\n"),
        OM("250 ok\r\n"),
        OM("250 ok\r\n250 extra\r\n"),
        CONNECTED(PLAINTEXT),
        OM("220 mx\r\n"),
        OM("250 mx\r\n"),
        OM("250 ok\r\n"),
        OM("250 ok\r\n"),
        OC("DATA\r\n"),
        OM("354 go\r\n"),
        OC("Subject: x\r\n"),
        OM("250 early\r\n"),
        OC("rest\r\n.\r\nBDAT 3\r\nabcFROB\r\n" + "x" * 600),
    ),
}

TARGETS = {
    "outbound_session": OUTBOUND,
    "smtp_session": SMTP,
    "imap_session": IMAP,
    "pop3_session": POP3,
    "line_framer": LINE_FRAMER,
    "smtp_body": SMTP_BODY,
    "mta_sts_policy": MTA_STS_POLICY,
}


def main():
    for target, seeds in TARGETS.items():
        folder = os.path.join(HERE, target)
        os.makedirs(folder, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
