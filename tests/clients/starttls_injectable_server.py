#!/usr/bin/env python3
"""A tiny SMTP / IMAP / POP3 server with STARTTLS, for checking that an attack tool
detects the NO STARTTLS command injection at all (tests/e2e_attack_tools.rs).

--mode vulnerable reproduces the bug: the server reads commands through its own
buffer, and the bytes a client pipelined behind STARTTLS stay in that buffer across
the TLS handshake, so they are executed and answered inside TLS as if the client had
sent them encrypted (CVE-2011-0411 and the NO STARTTLS paper's findings).
--mode fixed empties the buffer at STARTTLS, as a correct server does.

usage: starttls_injectable_server.py --protocol smtp|imap|pop3 --port N
                                     --cert PEM --key PEM [--mode vulnerable|fixed]
Listens on 127.0.0.1:N until killed or until its standard input closes (so it never
outlives the test that started it). Prints nothing; errors go to stderr.
"""

import argparse
import os
import socket
import ssl
import sys
import threading

# Bound on every socket operation: a stuck client never holds a thread for long.
SOCKET_TIMEOUT = 30


class Conn:
    def __init__(self, sock, context, protocol, mode):
        self.sock = sock
        self.context = context
        self.protocol = protocol
        self.mode = mode
        self.buf = b""
        self.tls = False

    def send(self, text):
        self.sock.sendall(text.encode())

    def line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r").decode(errors="replace")

    def start_tls(self, go_ahead):
        # Whatever the client sent right behind STARTTLS is already here or on its way
        # (it came in the same write); take it into the buffer before answering, so the
        # bug does not depend on how the bytes were segmented.
        self.sock.settimeout(0.3)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    break
                self.buf += data
        except (socket.timeout, BlockingIOError):
            pass
        self.sock.settimeout(SOCKET_TIMEOUT)
        if self.mode == "fixed":
            self.buf = b""
        self.send(go_ahead)
        self.sock = self.context.wrap_socket(self.sock, server_side=True)
        self.tls = True

    def serve(self):
        handler = {"smtp": self.smtp, "imap": self.imap, "pop3": self.pop3}[self.protocol]
        handler()

    def smtp(self):
        self.send("220 injectable.test ESMTP\r\n")
        while (line := self.line()) is not None:
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                last = "AUTH PLAIN" if self.tls else "STARTTLS"
                self.send(f"250-injectable.test\r\n250-PIPELINING\r\n250 {last}\r\n")
            elif verb == "STARTTLS" and not self.tls:
                self.start_tls("220 2.0.0 Ready to start TLS\r\n")
            elif verb in ("NOOP", "RSET"):
                self.send("250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye\r\n")
                return
            else:
                self.send("502 5.5.2 Error: command not recognized\r\n")

    def imap(self):
        self.send("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] injectable ready\r\n")
        while (line := self.line()) is not None:
            parts = line.split(" ", 2)
            tag = parts[0]
            command = parts[1].upper() if len(parts) > 1 else ""
            if command == "STARTTLS" and not self.tls:
                self.start_tls(f"{tag} OK Begin TLS negotiation now\r\n")
            elif command == "NOOP":
                self.send(f"{tag} OK NOOP completed\r\n")
            elif command == "CAPABILITY":
                self.send(f"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK CAPABILITY completed\r\n")
            elif command == "LOGOUT":
                self.send(f"* BYE Logging out\r\n{tag} OK Logout completed\r\n")
                return
            else:
                self.send(f"{tag} BAD Unknown command\r\n")

    def pop3(self):
        self.send("+OK injectable ready\r\n")
        while (line := self.line()) is not None:
            verb = line.split(" ", 1)[0].upper()
            if verb == "STLS" and not self.tls:
                self.start_tls("+OK Begin TLS negotiation\r\n")
            elif verb == "CAPA":
                self.send("+OK\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n")
            elif verb == "USER":
                self.send("+OK\r\n")
            elif verb == "QUIT":
                self.send("+OK Logging out\r\n")
                return
            else:
                self.send("-ERR Unknown command\r\n")


def handle(sock, context, protocol, mode):
    sock.settimeout(SOCKET_TIMEOUT)
    conn = Conn(sock, context, protocol, mode)
    try:
        conn.serve()
    except (OSError, ssl.SSLError):
        pass
    finally:
        try:
            # A TLS session ends with close_notify (RFC 8446 6.1): clients that treat a
            # bare TCP close as an error (OpenSSL 3 without IGNORE_UNEXPECTED_EOF, as
            # command-injection-tester sets it up on some Pythons) must see a clean end.
            if conn.tls:
                conn.sock = conn.sock.unwrap()
        except (OSError, ValueError, ssl.SSLError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["smtp", "imap", "pop3"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--mode", choices=["vulnerable", "fixed"], default="vulnerable")
    args = parser.parse_args()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(16)

    def watch_stdin():
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    while True:
        sock, _ = listener.accept()
        threading.Thread(
            target=handle, args=(sock, context, args.protocol, args.mode), daemon=True
        ).start()


if __name__ == "__main__":
    main()
