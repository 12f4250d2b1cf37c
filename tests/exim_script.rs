//! `scripts/exim.sh`, the real Exim 4.96 that tests/e2e_exim.rs stands on: it stops
//! everything it started, sessions in progress included, and refuses, saying why and
//! leaving nothing running, when it cannot start.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use common::exim::{EXIM_SCRIPT_LIMIT, Exim, Greeting, exim_command};

/// Live processes (not zombies) whose command line names `dir`: every Exim process of
/// the instance names its config file, the watcher its directory.
fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.display().to_string();
    common::processes()
        .into_iter()
        .filter(|process| process.state() != "Z")
        .map(|process| (process.pid, process.cmdline()))
        .filter(|(_, cmdline)| cmdline.contains(&dir))
        .collect()
}

/// Runs `start` (an `exim.sh start`), which must fail with exit code 1 saying `words`.
fn assert_start_refused(start: &mut std::process::Command, words: &str) {
    let started = common::run_bounded(start, EXIM_SCRIPT_LIMIT);
    assert_eq!(started.code, Some(1), "{}", started.both());
    assert!(started.stderr.contains(words), "{}", started.both());
}

#[test]
fn stop_ends_the_daemon_its_watcher_and_a_session_in_the_middle_of_data() {
    let exim = Exim::start(Greeting::Esmtp);
    let stream = std::net::TcpStream::connect(exim.smtp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    let mut reply = |reader: &mut BufReader<std::net::TcpStream>| loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.clone();
        }
    };
    assert!(reply(&mut reader).starts_with("220 "));
    for (command, code) in [
        ("EHLO client.example", "250 "),
        ("MAIL FROM:<bob@remote.example>", "250 "),
        ("RCPT TO:<alice@example.test>", "250 "),
        ("DATA", "354 "),
    ] {
        writer
            .write_all(format!("{command}\r\n").as_bytes())
            .unwrap();
        let got = reply(&mut reader);
        assert!(got.starts_with(code), "{command}: {got}");
    }
    writer.write_all(b"Subject: never finished\r\n").unwrap();
    // The daemon, the session's process and the watcher.
    assert!(
        processes_naming(exim.dir()).len() >= 3,
        "{:?}",
        processes_naming(exim.dir())
    );

    let stopped = common::run_bounded(&mut exim_command("stop", exim.dir()), EXIM_SCRIPT_LIMIT);
    assert_eq!(stopped.code, Some(0), "{}", stopped.both());
    assert_eq!(processes_naming(exim.dir()), []);
    // Stopping what is stopped is fine.
    let again = common::run_bounded(&mut exim_command("stop", exim.dir()), EXIM_SCRIPT_LIMIT);
    assert_eq!(again.code, Some(0), "{}", again.both());
    // Nothing half-received was delivered.
    assert_eq!(exim.messages().len(), 0);
}

#[test]
fn a_start_on_a_busy_port_is_refused_and_leaves_nothing_running() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::Builder::new()
        .prefix("mailmoat-exim-")
        .tempdir()
        .unwrap();
    assert_start_refused(
        exim_command("start", dir.path())
            .arg("--watch")
            .arg(std::process::id().to_string())
            .env("EXIM_SMTP_PORT", port.to_string()),
        &format!("port 127.0.0.1:{port} is already in use"),
    );
    assert_eq!(processes_naming(dir.path()), []);
}

#[test]
fn a_start_without_the_unpacked_exim_is_refused_naming_install_deps() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = tempfile::tempdir().unwrap();
    assert_start_refused(
        exim_command("start", &dir.path().join("instance"))
            .env("EXIM_SMTP_PORT", common::free_port().to_string())
            .env("MAILMOAT_EXIM_ROOT", nowhere.path()),
        "run scripts/install-deps.sh as root",
    );
    assert!(!dir.path().join("instance").exists());
}
