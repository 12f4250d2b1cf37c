use super::*;
use crate::proto::smtp::canonical::envelope_args;
use proptest::prelude::*;

fn mail(args: &str) -> EnvelopeArgs<'_> {
    envelope_args(Envelope::Mail, args.as_bytes()).expect("a valid MAIL argument")
}

fn rcpt(args: &str) -> EnvelopeArgs<'_> {
    envelope_args(Envelope::Rcpt, args.as_bytes()).expect("a valid RCPT argument")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An MX offering everything the relay passes on, without a size limit.
const FULL: Extensions = Extensions {
    size: Some(0),
    eight_bit_mime: true,
    smtputf8: true,
    dsn: true,
    pipelining: true,
    starttls: true,
};

#[test]
fn an_ehlo_reply_is_read_for_the_extensions_the_relay_uses() {
    let lines: [&[u8]; 8] = [
        b"mx.example.test ESMTP says SIZE in its greeting",
        b"PIPELINING",
        b"size 10240000",
        b"8BITMIME",
        b"STARTTLS",
        b"DSN",
        b"SMTPUTF8",
        b"X-UNKNOWN whatever",
    ];
    assert_eq!(
        Extensions::from_ehlo_reply(lines),
        Extensions {
            size: Some(10_240_000),
            ..FULL
        }
    );
    let bare: [&[u8]; 2] = [b"mx.example.test", b"SIZE"];
    assert_eq!(
        Extensions::from_ehlo_reply(bare),
        Extensions {
            size: Some(0),
            ..Extensions::default()
        }
    );
    // The greeting line names no extension, even when it looks like one.
    let greeting_only: [&[u8]; 1] = [b"STARTTLS"];
    assert_eq!(
        Extensions::from_ehlo_reply(greeting_only),
        Extensions::default()
    );
}

#[test]
fn the_mx_gets_the_parameters_it_offers_and_dsn_is_dropped_where_it_offers_none() {
    let args = mail("FROM:<a@b.example> size=1000 BODY=8BITMIME RET=HDRS ENVID=QQ314159");
    let wants = mail_requirements(&args).unwrap();
    assert_eq!(
        wants,
        MailRequirements {
            size: Some(1000),
            eight_bit: true,
            smtputf8: false
        }
    );
    let line = mail_line(&args, &wants, &FULL).unwrap();
    assert_eq!(
        text(&line),
        "MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ314159\r\n"
    );
    let no_dsn_no_size = Extensions {
        dsn: false,
        size: None,
        ..FULL
    };
    let line = mail_line(&args, &wants, &no_dsn_no_size).unwrap();
    assert_eq!(text(&line), "MAIL FROM:<a@b.example> BODY=8BITMIME\r\n");

    let args = rcpt("TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.example");
    check_rcpt_params(&args).unwrap();
    assert_eq!(
        text(&rcpt_line(&args, &FULL)),
        "RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.example\r\n"
    );
    assert_eq!(
        text(&rcpt_line(&args, &Extensions::default())),
        "RCPT TO:<c@d.example>\r\n"
    );
}

#[test]
fn what_the_mx_cannot_take_unchanged_is_refused_never_converted() {
    let table: &[(&str, Extensions, &[u8])] = &[
        (
            "FROM:<a@b> BODY=8BITMIME",
            Extensions {
                eight_bit_mime: false,
                ..FULL
            },
            reply::NO_8BITMIME,
        ),
        (
            "FROM:<a@b> SMTPUTF8",
            Extensions {
                smtputf8: false,
                ..FULL
            },
            reply::NO_SMTPUTF8,
        ),
        (
            "FROM:<a@b> SIZE=1001",
            Extensions {
                size: Some(1000),
                ..FULL
            },
            reply::TOO_BIG,
        ),
    ];
    for (args, mx, expected) in table {
        let args = mail(args);
        let wants = mail_requirements(&args).unwrap();
        assert_eq!(mail_line(&args, &wants, mx), Err(Refusal(expected)));
    }
    // 7BIT needs nothing of the MX; at the limit is within it.
    let args = mail("FROM:<a@b> BODY=7BIT SIZE=1000");
    let wants = mail_requirements(&args).unwrap();
    let plain = Extensions {
        size: Some(1000),
        ..Extensions::default()
    };
    assert_eq!(
        text(&mail_line(&args, &wants, &plain).unwrap()),
        "MAIL FROM:<a@b> SIZE=1000\r\n"
    );
}

#[test]
fn parameters_the_relay_does_not_offer_or_cannot_read_are_refused() {
    let table: &[(&str, &[u8])] = &[
        ("FROM:<a@b> AUTH=<>", reply::UNKNOWN_PARAMETER),
        ("FROM:<a@b> BODY=BINARYMIME", reply::BAD_PARAMETER),
        ("FROM:<a@b> SIZE=12x", reply::BAD_PARAMETER),
        (
            "FROM:<a@b> SIZE=123456789012345678901",
            reply::BAD_PARAMETER,
        ),
        ("FROM:<a@b> SIZE", reply::BAD_PARAMETER),
        ("FROM:<a@b> SMTPUTF8=yes", reply::BAD_PARAMETER),
        ("FROM:<a@b> RET=ALL", reply::BAD_PARAMETER),
        ("FROM:<a@b> ENVID=a+zz", reply::BAD_PARAMETER),
        ("FROM:<a@b> SIZE=1 size=2", reply::DUPLICATE_PARAMETER),
    ];
    for (args, expected) in table {
        assert_eq!(
            mail_requirements(&mail(args)),
            Err(Refusal(expected)),
            "{args}"
        );
    }
    let table: &[(&str, &[u8])] = &[
        ("TO:<a@b> NOTIFY=NEVER,SUCCESS", reply::BAD_PARAMETER),
        ("TO:<a@b> NOTIFY=SOMETIMES", reply::BAD_PARAMETER),
        ("TO:<a@b> ORCPT=rfc822", reply::BAD_PARAMETER),
        ("TO:<a@b> ORCPT=;a@b", reply::BAD_PARAMETER),
        ("TO:<a@b> XFORWARD=1", reply::UNKNOWN_PARAMETER),
        (
            "TO:<a@b> NOTIFY=DELAY NOTIFY=NEVER",
            reply::DUPLICATE_PARAMETER,
        ),
    ];
    for (args, expected) in table {
        assert_eq!(
            check_rcpt_params(&rcpt(args)),
            Err(Refusal(expected)),
            "{args}"
        );
    }
}

#[test]
fn the_recipient_domain_is_the_name_dns_knows() {
    let table: &[(&str, Result<&str, &[u8]>)] = &[
        ("user@Example.TEST", Ok("example.test")),
        ("user@mx.example.test.", Ok("mx.example.test")),
        ("\"a@b\"@example.test", Ok("example.test")),
        ("user@bücher.example", Ok("xn--bcher-kva.example")),
        ("Postmaster", Err(reply::NO_DOMAIN)),
        ("user@[192.0.2.1]", Err(reply::ADDRESS_LITERAL)),
        ("user@localhost", Err(reply::BAD_DOMAIN)),
        ("user@a..b", Err(reply::BAD_DOMAIN)),
        ("user@a b.example", Err(reply::BAD_DOMAIN)),
    ];
    for (address, expected) in table {
        let got = recipient_domain(address.as_bytes());
        let got = got.as_ref().map(Domain::as_str).map_err(|r| r.0);
        assert_eq!(got, *expected, "{address}");
    }
    assert_eq!(
        recipient_domain(b"user@\xff.example"),
        Err(Refusal(reply::BAD_DOMAIN))
    );
    let long = format!("user@{}.example", "a".repeat(64));
    assert_eq!(
        recipient_domain(long.as_bytes()),
        Err(Refusal(reply::BAD_DOMAIN))
    );
}

proptest! {
    /// Whatever the legacy MTA writes, the relay's reading of it never panics, and a
    /// line it writes for the MX is one line: no CR or LF inside, CRLF at the end.
    #[test]
    fn any_envelope_reads_without_panic_and_writes_one_line(args in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(parsed) = envelope_args(Envelope::Mail, &args)
            && let Ok(wants) = mail_requirements(&parsed)
            && let Ok(line) = mail_line(&parsed, &wants, &FULL)
        {
            prop_assert!(line.ends_with(b"\r\n"));
            prop_assert!(!line[..line.len() - 2].iter().any(|&b| b == b'\r' || b == b'\n'));
        }
        if let Ok(parsed) = envelope_args(Envelope::Rcpt, &args) {
            let _ = recipient_domain(parsed.address);
            if check_rcpt_params(&parsed).is_ok() {
                let line = rcpt_line(&parsed, &FULL);
                prop_assert!(!line[..line.len() - 2].iter().any(|&b| b == b'\r' || b == b'\n'));
            }
        }
    }
}
