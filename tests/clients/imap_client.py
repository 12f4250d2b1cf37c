#!/usr/bin/env python3
"""Real-client driver for the IMAP end-to-end tests: Python's imaplib and a raw IMAP
client over TCP, TLS (STARTTLS or implicit) and COMPRESS=DEFLATE, against mailmoat.

Each subcommand prints one JSON object on stdout; the Rust tests assert on it. Server
lines are reported verbatim (CRLF included) so the tests can compare exact bytes.
`--no-tls` runs the same dialogue without TLS, to validate the driver directly against
the legacy Dovecot (which allows plaintext login).
"""
import argparse
import imaplib
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import time
import zlib

SERVER_NAME = "mail.example.test"
TIMEOUT = 60
HERE = os.path.dirname(os.path.abspath(__file__))


def tls_context(cafile):
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def text(data):
    if data is None:
        return None
    return data.decode("utf-8", "replace")


class Raw:
    """A minimal IMAP client that keeps every line it reads, literals included."""

    def __init__(self, port, cafile=None, implicit=False):
        self.cafile = cafile
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if implicit:
            self.sock = tls_context(cafile).wrap_socket(self.sock, server_hostname=SERVER_NAME)
        self.buf = b""
        self.inflate = None
        self.deflate = None
        self.closed = False

    def tls_info(self):
        if isinstance(self.sock, ssl.SSLSocket):
            return {"version": self.sock.version(), "cipher": self.sock.cipher()[0]}
        return None

    def starttls(self):
        """Upgrades after a STARTTLS go-ahead; nothing may be buffered."""
        assert self.buf == b"", f"bytes after the STARTTLS reply: {self.buf!r}"
        self.sock = tls_context(self.cafile).wrap_socket(self.sock, server_hostname=SERVER_NAME)

    def compress(self):
        """RFC 4978: raw DEFLATE both ways from the next byte on."""
        self.inflate = zlib.decompressobj(-15)
        self.deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        if self.buf:
            self.buf = self.inflate.decompress(self.buf)

    def send(self, data):
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def _fill(self, timeout=TIMEOUT):
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise EOFError(f"connection closed; unread: {self.buf!r}")
        if self.inflate is not None:
            data = self.inflate.decompress(data)
        self.buf += data

    def line(self, timeout=TIMEOUT):
        """One line (CRLF included), with any literal it announces appended."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no complete line")
            self._fill(left)
        index = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:index], self.buf[index:]
        match = re.search(rb"\{(\d+)\}\r\n$", line)
        if match:
            size = int(match.group(1))
            while len(self.buf) < size:
                self._fill(max(1, deadline - time.monotonic()))
            line += self.buf[:size]
            self.buf = self.buf[size:]
            line += self.line(max(1, deadline - time.monotonic()))
        return line

    def until_tagged(self, tag, timeout=TIMEOUT):
        """Every line up to and including the tagged reply for `tag`."""
        lines = []
        while True:
            line = self.line(timeout)
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines

    def cmd(self, tag, command):
        self.send(f"{tag} {command}\r\n".encode())
        return self.until_tagged(tag)

    def cmd_cancel(self, tag, command):
        """A command that might get a "+" continuation: answer it with "*" (cancel)."""
        self.send(f"{tag} {command}\r\n".encode())
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(b"+"):
                self.send(b"*\r\n")
            elif line.startswith(tag.encode() + b" "):
                return lines

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def caps_of(lines):
    """Capability tokens from an untagged CAPABILITY reply or a [CAPABILITY] code."""
    for line in lines:
        s = text(line)
        m = re.match(r"\* CAPABILITY (.*?)\r?\n$", s)
        if m:
            return m.group(1).split(" ")
        m = re.search(r"\[CAPABILITY ([^\]]*)\]", s)
        if m:
            return m.group(1).split(" ")
    return None


def lines_json(lines):
    return [text(line) for line in lines]


# ---- subcommands


def cmd_pretls(args):
    """The dialogue before TLS, then STARTTLS and the list after it."""
    out = {}
    c = Raw(args.port, args.cafile)
    greeting = c.line()
    out["greeting"] = text(greeting)
    out["greeting_caps"] = caps_of([greeting])
    out["capability"] = lines_json(c.cmd("a1", "CAPABILITY"))
    out["caps"] = caps_of(c.cmd("a1b", "CAPABILITY"))
    out["id"] = lines_json(c.cmd("a2", "ID NIL"))
    out["noop"] = lines_json(c.cmd("a3", "NOOP"))
    out["select"] = lines_json(c.cmd("a4", "SELECT INBOX"))
    out["login"] = lines_json(c.cmd("a5", f'LOGIN "{args.user}" "{args.password}"'))
    # A LOGIN whose password is a synchronising literal: the refusal must come before
    # any "+" continuation, so the password is never sent.
    secret = args.password.encode()
    c.send(f"a6 LOGIN {args.user} {{{len(secret)}}}\r\n".encode())
    first = c.line(10)
    out["literal_login_first_line"] = text(first)
    if first.startswith(b"+"):
        # The proxy asked for the password: send a harmless one so the session stays in
        # step, and report what happened.
        c.send(b"x" * len(secret) + b"\r\n")
        out["literal_login_rest"] = lines_json(c.until_tagged("a6"))
    out["authenticate"] = lines_json(c.cmd_cancel("a7", "AUTHENTICATE PLAIN"))
    out["starttls_args"] = lines_json(c.cmd("a8", "STARTTLS now"))
    if args.no_tls:
        out["logout"] = lines_json(c.cmd("a9", "LOGOUT"))
        return out
    out["starttls"] = lines_json(c.cmd("a9", "STARTTLS"))
    c.starttls()
    out["tls"] = c.tls_info()
    out["post_caps"] = caps_of(c.cmd("b1", "CAPABILITY"))
    out["post_starttls_again"] = lines_json(c.cmd("b2", "STARTTLS"))
    out["logout"] = lines_json(c.cmd("b3", "LOGOUT"))
    return out


def cmd_caps(args):
    """Capability lists as the client sees them: greeting, CAPABILITY, after login."""
    c = Raw(args.port, args.cafile, implicit=args.implicit)
    greeting = c.line()
    out = {"greeting": text(greeting), "greeting_caps": caps_of([greeting])}
    if not args.implicit and not args.no_tls:
        out["starttls"] = lines_json(c.cmd("s", "STARTTLS"))
        c.starttls()
    out["caps"] = caps_of(c.cmd("c", "CAPABILITY"))
    login = c.cmd("l", f'LOGIN "{args.user}" "{args.password}"')
    out["login"] = lines_json(login)
    out["login_caps"] = caps_of(login)
    out["post_login_caps"] = caps_of(c.cmd("c2", "CAPABILITY"))
    out["logout"] = lines_json(c.cmd("z", "LOGOUT"))
    return out


class IMAP4To(imaplib.IMAP4):
    """imaplib connecting to 127.0.0.1 while verifying the certificate for SERVER_NAME."""

    def _create_socket(self, timeout):
        return socket.create_connection(("127.0.0.1", self.port), timeout)


class IMAP4SSLTo(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=SERVER_NAME)


def imaplib_login(args):
    info = {}
    if args.implicit:
        m = IMAP4SSLTo(SERVER_NAME, args.port, ssl_context=tls_context(args.cafile), timeout=TIMEOUT)
        info["tls"] = {"version": m.sock.version(), "cipher": m.sock.cipher()[0]}
    else:
        m = IMAP4To(SERVER_NAME, args.port, timeout=TIMEOUT)
        info["pre_tls_caps"] = list(m.capabilities)
        if not args.no_tls:
            typ, data = m.starttls(ssl_context=tls_context(args.cafile))
            info["starttls"] = [typ, [text(d) for d in data]]
            info["tls"] = {"version": m.sock.version(), "cipher": m.sock.cipher()[0]}
    info["caps"] = list(m.capabilities)
    typ, data = m.login(args.user, args.password)
    info["login"] = [typ, [text(d) for d in data]]
    return m, info


def find_by_message_id(m, message_id):
    typ, data = m.search(None, "HEADER", "Message-ID", message_id)
    assert typ == "OK", (typ, data)
    return data[0].split()


def cmd_fetch(args):
    """imaplib: (STARTTLS), LOGIN, SELECT INBOX, SEARCH by Message-ID, FETCH BODY[]."""
    m, info = imaplib_login(args)
    typ, data = m.select("INBOX")
    info["select"] = [typ, [text(d) for d in data]]
    nums = find_by_message_id(m, args.message_id)
    info["found"] = len(nums)
    if nums:
        typ, data = m.fetch(nums[-1], "(RFC822.SIZE BODY.PEEK[])")
        info["fetch_status"] = typ
        body = data[0][1]
        info["rfc822_size"] = int(re.search(rb"RFC822\.SIZE (\d+)", data[0][0]).group(1))
        info["fetched_bytes"] = len(body)
        with open(args.out, "wb") as f:
            f.write(body)
    typ, data = m.logout()
    info["logout"] = typ
    return info


def cmd_append(args):
    """APPEND with a synchronising literal and with LITERAL+, each read back by FETCH."""
    c = Raw(args.port, args.cafile, implicit=args.implicit)
    out = {"greeting": text(c.line())}
    if not args.implicit and not args.no_tls:
        out["starttls"] = lines_json(c.cmd("s", "STARTTLS"))
        c.starttls()
    out["caps"] = caps_of(c.cmd("c", "CAPABILITY"))
    out["login"] = lines_json(c.cmd("l", f'LOGIN "{args.user}" "{args.password}"'))
    out["post_login_caps"] = caps_of(c.cmd("c2", "CAPABILITY"))
    results = {}
    for mode in ["sync", "plus"]:
        mid = f"<{args.tag}-{mode}@client.example>"
        message = (
            f"From: Alice <alice@example.test>\r\nTo: Alice <alice@example.test>\r\n"
            f"Subject: {args.tag} {mode}\r\nMessage-ID: {mid}\r\n"
            f"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n\r\n"
            f"appended with a {mode} literal\r\n{{5}}\r\n* looks like a reply\r\na1 OK not really\r\n"
        ).encode()
        r = {"sent": text(message)}
        if mode == "sync":
            c.send(f"p1 APPEND INBOX (\\Seen) {{{len(message)}}}\r\n".encode())
            cont = c.line()
            r["continuation"] = text(cont)
            if cont.startswith(b"+"):
                c.send(message + b"\r\n")
            r["reply"] = lines_json(c.until_tagged("p1"))
        else:
            c.send(f"p2 APPEND INBOX (\\Seen) {{{len(message)}+}}\r\n".encode() + message + b"\r\n")
            r["reply"] = lines_json(c.until_tagged("p2"))
        c.cmd("e", "EXAMINE INBOX")
        search = c.cmd("f", f"SEARCH HEADER Message-ID {mid}")
        nums = []
        for line in search:
            if line.startswith(b"* SEARCH"):
                nums = text(line).split()[2:]
        r["found"] = len(nums)
        if nums:
            fetched = c.cmd("g", f"FETCH {nums[-1]} BODY.PEEK[]")
            body = fetched[0]
            start = body.index(b"}\r\n") + 3
            size = int(re.search(rb"\{(\d+)\}\r\n", body).group(1))
            r["fetched"] = text(body[start:start + size])
            r["identical"] = body[start:start + size] == message
        results[mode] = r
    out["results"] = results
    out["logout"] = lines_json(c.cmd("z", "LOGOUT"))
    return out


def delivered(maildir, tag):
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(maildir, sub))
        except FileNotFoundError:
            continue
        for name in names:
            try:
                with open(os.path.join(maildir, sub, name), "rb") as f:
                    if tag.encode() in f.read():
                        return True
            except FileNotFoundError:
                continue
    return False


def cmd_idle(args):
    """IDLE in INBOX while a message is delivered through mailmoat's SMTP listener."""
    c = Raw(args.port, args.cafile, implicit=args.implicit)
    out = {"greeting": text(c.line())}
    if not args.implicit and not args.no_tls:
        out["starttls"] = lines_json(c.cmd("s", "STARTTLS"))
        c.starttls()
    out["login"] = lines_json(c.cmd("l", f'LOGIN "{args.user}" "{args.password}"'))
    out["select"] = lines_json(c.cmd("s2", "SELECT INBOX"))
    c.send(b"i IDLE\r\n")
    out["idle_continuation"] = text(c.line())
    # Deliver through the SMTP listener while idling.
    send = [sys.executable, os.path.join(HERE, "smtp_client.py"), "send", "--port", str(args.smtp_port),
            "--user", args.user, "--password", args.password, "--message-file", args.message_file]
    if args.cafile:
        send += ["--cafile", args.cafile]
    if args.no_tls:
        # Validation against the legacy Postfix directly: it offers no TLS.
        import smtplib
        with open(args.message_file, "rb") as f:
            smtplib.SMTP("127.0.0.1", args.smtp_port, timeout=TIMEOUT).sendmail(
                "bob@example.test", [args.user], f.read())
        out["smtp_exit"] = 0
    else:
        sent = subprocess.run(send, capture_output=True, timeout=120)
        out["smtp_exit"] = sent.returncode
        out["smtp_stderr"] = text(sent.stderr)[-2000:]
    untagged = []
    exists = []
    deadline = time.monotonic() + 60
    seen_at = None
    while time.monotonic() < deadline:
        if seen_at is None and delivered(args.maildir, args.tag):
            seen_at = time.monotonic()
        if seen_at is not None and exists and exists[-1][1] > seen_at - 0.001:
            break
        if seen_at is not None and time.monotonic() > seen_at + 5:
            break
        try:
            line = c.line(0.2)
        except socket.timeout:
            continue
        untagged.append(text(line))
        m = re.match(rb"\* (\d+) EXISTS", line)
        if m:
            exists.append((int(m.group(1)), time.monotonic()))
    out["delivered"] = seen_at is not None
    out["idle_untagged"] = untagged
    out["exists"] = [n for n, _ in exists]
    c.send(b"DONE\r\n")
    out["idle_done"] = lines_json(c.until_tagged("i"))
    search = c.cmd("f", f"SEARCH HEADER Message-ID <{args.tag}@client.example>")
    out["search"] = lines_json(search)
    nums = []
    for line in search:
        if line.startswith(b"* SEARCH"):
            nums = [int(n) for n in text(line).split()[2:]]
    out["found"] = nums
    out["logout"] = lines_json(c.cmd("z", "LOGOUT"))
    return out


def cmd_compress(args):
    """COMPRESS=DEFLATE after login, then SELECT, FETCH, NOOP and LOGOUT through it."""
    c = Raw(args.port, args.cafile, implicit=args.implicit)
    out = {"greeting": text(c.line())}
    if not args.implicit and not args.no_tls:
        out["starttls"] = lines_json(c.cmd("s", "STARTTLS"))
        c.starttls()
    login = c.cmd("l", f'LOGIN "{args.user}" "{args.password}"')
    out["login"] = lines_json(login)
    out["post_login_caps"] = caps_of(c.cmd("c", "CAPABILITY"))
    out["compress"] = lines_json(c.cmd("z1", "COMPRESS DEFLATE"))
    if out["compress"][-1].startswith("z1 OK"):
        c.compress()
        out["select"] = lines_json(c.cmd("z2", "SELECT INBOX"))
        search = c.cmd("z3", f"SEARCH HEADER Message-ID <{args.tag}@client.example>")
        out["search"] = lines_json(search)
        nums = []
        for line in search:
            if line.startswith(b"* SEARCH"):
                nums = text(line).split()[2:]
        if nums:
            fetched = c.cmd("z4", f"FETCH {nums[-1]} BODY.PEEK[]")
            out["fetch_status"] = text(fetched[-1])
            with open(args.out, "wb") as f:
                body = fetched[0]
                size = int(re.search(rb"\{(\d+)\}\r\n", body).group(1))
                start = body.index(b"}\r\n") + 3
                f.write(body[start:start + size])
        out["noop"] = lines_json(c.cmd("z5", "NOOP"))
        out["logout"] = lines_json(c.cmd("z6", "LOGOUT"))
    return out


def cmd_tunnel(args):
    """stdin/stdout <-> 127.0.0.1:PORT, for a client's Tunnel setting (mbsync): the
    client then verifies the certificate against its configured host name, without any
    name resolution."""
    sock = socket.create_connection(("127.0.0.1", args.port), timeout=TIMEOUT)
    sock.settimeout(None)
    stdin, stdout = 0, 1
    inputs = [sock, stdin]
    while inputs:
        ready, _, _ = select.select(inputs, [], [], 300)
        if not ready:
            return None
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return None
            try:
                while data:
                    data = data[os.write(stdout, data):]
            except BrokenPipeError:
                # The client gave up (e.g. it refused the certificate).
                return None
        if stdin in ready:
            data = os.read(stdin, 65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                inputs.remove(stdin)
            else:
                sock.sendall(data)
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["pretls", "caps", "fetch", "append", "idle", "compress", "tunnel"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--no-tls", action="store_true", help="plaintext, to validate against Dovecot directly")
    parser.add_argument("--cafile")
    parser.add_argument("--user", default="alice@example.test")
    parser.add_argument("--password", default="alice-secret-pw")
    parser.add_argument("--message-id")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out")
    parser.add_argument("--smtp-port", type=int)
    parser.add_argument("--message-file")
    parser.add_argument("--maildir")
    args = parser.parse_args()
    handler = {"pretls": cmd_pretls, "caps": cmd_caps, "fetch": cmd_fetch, "append": cmd_append,
               "idle": cmd_idle, "compress": cmd_compress, "tunnel": cmd_tunnel}[args.command]
    result = handler(args)
    if result is not None:
        json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
