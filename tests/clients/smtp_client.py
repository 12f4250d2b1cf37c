#!/usr/bin/env python3
"""Real-client driver for the end-to-end tests: Python's smtplib against mailmoat.

Each subcommand prints one JSON object on stdout; the Rust tests assert on it.
"""
import argparse
import base64
import concurrent.futures
import json
import smtplib
import ssl
import sys

SERVER_NAME = "mail.example.test"


def tls_context(cafile):
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = True
    return context


def features(client):
    return sorted(client.esmtp_features.keys())


def pretls_auth(args):
    client = smtplib.SMTP("127.0.0.1", args.port, timeout=20)
    client.ehlo("client.example")
    before = features(client)
    initial = base64.b64encode(f"\0{args.user}\0{args.password}".encode()).decode()
    code, text = client.docmd("AUTH", "PLAIN " + initial)
    client.quit()
    return {"features": before, "auth_code": code, "auth_text": text.decode()}


def open_session(args):
    """Connect, upgrade (or implicit TLS), EHLO, AUTH: returns (client, info)."""
    info = {}
    if args.implicit:
        client = smtplib.SMTP_SSL(timeout=60, context=tls_context(args.cafile))
        client._host = SERVER_NAME  # the name the certificate is verified against
        client.connect("127.0.0.1", args.port)
        client.ehlo("client.example")
    else:
        client = smtplib.SMTP("127.0.0.1", args.port, timeout=60)
        client._host = SERVER_NAME  # smtplib verifies the certificate against this name
        client.ehlo("client.example")
        info["pre_tls_features"] = features(client)
        client.starttls(context=tls_context(args.cafile))
        client.ehlo("client.example")
    info["post_tls_features"] = features(client)
    info["auth_line"] = client.esmtp_features.get("auth", "")
    if args.user:
        client.login(args.user, args.password)
    return client, info


def send(args):
    with open(args.message_file, "rb") as f:
        message = f.read()
    client, info = open_session(args)
    refused = client.sendmail(args.sender, [args.to], message)
    info["refused"] = {k: [v[0], v[1].decode()] for k, v in refused.items()}
    client.quit()
    return info


def run_concurrent(args):
    def one(index):
        client, _ = open_session(args)
        body = (f"Subject: {args.tag} {index}\r\nFrom: <{args.sender}>\r\nTo: <{args.to}>\r\n\r\n"
                f"message {index} of {args.count}\r\n").encode()
        client.sendmail(args.sender, [args.to], body)
        client.quit()
        return index

    errors = []
    ok = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.count) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, i) for i in range(args.count)]):
            try:
                future.result()
                ok += 1
            except Exception as err:  # reported, asserted by the test
                errors.append(repr(err))
    return {"ok": ok, "errors": errors[:5]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["pretls-auth", "send", "concurrent"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--sender", default="bob@example.test")
    parser.add_argument("--to", default="alice@example.test")
    parser.add_argument("--message-file")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    result = {"pretls-auth": pretls_auth, "send": send, "concurrent": run_concurrent}[args.command](args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
