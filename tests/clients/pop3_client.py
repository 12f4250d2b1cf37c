#!/usr/bin/env python3
"""Real-client driver for the POP3 end-to-end tests: Python's poplib (STLS and
implicit TLS) and a raw POP3 client for the exact replies before TLS, against mailmoat.

Each subcommand prints one JSON object on stdout; the Rust tests assert on it. Server
lines are reported verbatim (CRLF included). `--no-tls` runs the same dialogue without
TLS, to validate the driver directly against the legacy Dovecot.
"""
import argparse
import json
import poplib
import socket
import ssl
import sys
import time

SERVER_NAME = "mail.example.test"
TIMEOUT = 60


def tls_context(cafile):
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def text(data):
    return data.decode("utf-8", "replace")


class Raw:
    """A minimal POP3 client that reports every line verbatim."""

    def __init__(self, port, cafile=None):
        self.cafile = cafile
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def line(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no complete line")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unread: {self.buf!r}")
            self.buf += data
        index = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:index], self.buf[index:]
        return line

    def cmd(self, command, multiline=False):
        """The reply lines: one, or a +OK multi-line reply up to its "." line."""
        self.sock.sendall(command.encode() + b"\r\n")
        lines = [self.line()]
        if multiline and lines[0].startswith(b"+OK"):
            while lines[-1] != b".\r\n":
                lines.append(self.line())
        return [text(line) for line in lines]

    def starttls(self):
        assert self.buf == b"", f"bytes after the STLS reply: {self.buf!r}"
        self.sock = tls_context(self.cafile).wrap_socket(self.sock, server_hostname=SERVER_NAME)
        return {"version": self.sock.version(), "cipher": self.sock.cipher()[0]}


def capa_of(lines):
    """CAPA lines without the status line and the terminating dot."""
    if not lines or not lines[0].startswith("+OK"):
        return None
    return [line.rstrip("\r\n") for line in lines[1:-1]]


def cmd_pretls(args):
    c = Raw(args.port, args.cafile)
    out = {"greeting": text(c.line())}
    out["capa"] = c.cmd("CAPA", multiline=True)
    out["capa_list"] = capa_of(out["capa"])
    out["noop"] = c.cmd("NOOP")
    out["user"] = c.cmd(f"USER {args.user}")
    # A client that ignores the refusal and sends its password anyway.
    out["pass"] = c.cmd(f"PASS {args.password}")
    out["auth"] = c.cmd("AUTH PLAIN")
    if out["auth"][0].startswith("+"):
        out["auth"] += c.cmd("*")
    out["apop"] = c.cmd(f"APOP {args.user} 0123456789abcdef0123456789abcdef")
    out["stat"] = c.cmd("STAT")
    out["stls_args"] = c.cmd("STLS now")
    if args.no_tls:
        out["quit"] = c.cmd("QUIT")
        return out
    out["stls"] = c.cmd("STLS")
    out["tls"] = c.starttls()
    out["post_capa"] = c.cmd("CAPA", multiline=True)
    out["post_capa_list"] = capa_of(out["post_capa"])
    out["post_stls_again"] = c.cmd("STLS")
    out["quit"] = c.cmd("QUIT")
    return out


class POP3To(poplib.POP3):
    """poplib connecting to 127.0.0.1 while verifying the certificate for SERVER_NAME."""

    def _create_socket(self, timeout):
        return socket.create_connection(("127.0.0.1", self.port), timeout)


class POP3SSLTo(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout)
        return self.context.wrap_socket(sock, server_hostname=SERVER_NAME)


def capa_json(client):
    return {k: v for k, v in client.capa().items()}


def cmd_session(args):
    """poplib: (STLS), USER/PASS, STAT, LIST, UIDL, find our message by TOP, RETR it,
    TOP it, DELE it, QUIT."""
    info = {}
    poplib._MAXLINE = 1 << 20
    if args.implicit:
        p = POP3SSLTo(SERVER_NAME, args.port, timeout=TIMEOUT, context=tls_context(args.cafile))
        info["tls"] = {"version": p.sock.version(), "cipher": p.sock.cipher()[0]}
    else:
        p = POP3To(SERVER_NAME, args.port, timeout=TIMEOUT)
        info["pre_tls_capa"] = capa_json(p)
        if not args.no_tls:
            info["stls"] = text(p.stls(context=tls_context(args.cafile)))
            info["tls"] = {"version": p.sock.version(), "cipher": p.sock.cipher()[0]}
    info["greeting"] = text(p.getwelcome())
    info["capa"] = capa_json(p)
    info["user"] = text(p.user(args.user))
    info["pass"] = text(p.pass_(args.password))
    count, size = p.stat()
    info["stat"] = [count, size]
    resp, listing, _ = p.list()
    info["list_status"] = text(resp)
    sizes = {}
    for entry in listing:
        num, octets = entry.split()
        sizes[int(num)] = int(octets)
    info["list_count"] = len(sizes)
    resp, uidls, _ = p.uidl()
    info["uidl_status"] = text(resp)
    uids = {}
    for entry in uidls:
        num, uid = entry.split()
        uids[int(num)] = text(uid)
    info["uidl_count"] = len(uids)
    # Our message, by its Message-ID header (the mailbox holds other tests' mail too).
    needle = f"Message-ID: <{args.tag}@client.example>".lower().encode()
    found = []
    for num in sorted(sizes):
        resp, lines, _ = p.top(num, 0)
        if any(line.lower() == needle for line in lines):
            found.append(num)
    info["found"] = found
    if found:
        num = found[-1]
        info["list_size"] = sizes[num]
        info["list_one"] = text(p.list(num))
        info["uidl_one"] = text(p.uidl(num))
        info["uid"] = uids[num]
        resp, lines, octets = p.retr(num)
        info["retr_status"] = text(resp)
        info["retr_octets"] = octets
        # poplib removes the dot-stuffing and the CRLFs: put the CRLFs back.
        with open(args.out, "wb") as f:
            f.write(b"".join(line + b"\r\n" for line in lines))
        resp, lines, _ = p.top(num, 3)
        info["top_status"] = text(resp)
        info["top"] = [text(line) for line in lines]
        if args.delete:
            info["dele"] = text(p.dele(num))
    info["quit"] = text(p.quit())
    return info


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["pretls", "session"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--no-tls", action="store_true", help="plaintext, to validate against Dovecot directly")
    parser.add_argument("--cafile")
    parser.add_argument("--user", default="alice@example.test")
    parser.add_argument("--password", default="alice-secret-pw")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out")
    parser.add_argument("--delete", action="store_true")
    args = parser.parse_args()
    result = {"pretls": cmd_pretls, "session": cmd_session}[args.command](args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
