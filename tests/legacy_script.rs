//! The real legacy servers' own script, `scripts/legacy.sh`, which every end-to-end test
//! and the demo stand on. Postfix logs through postlogd's datagram socket with blocking
//! sends; once that socket's queue is full and postlogd is not draining it, every
//! Postfix process that logs blocks, `postfix stop` included. A CI run was lost to
//! exactly that: an extra setting repeated a default, every daemon warned about it as it
//! started, and postlogd blocked on its own socket.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{LEGACY_SCRIPT_LIMIT, Legacy};

/// Live processes (not zombies) started with `MAIL_CONFIG=conf`: every Postfix process
/// of one instance, as (pid, command name).
fn instance_processes(conf: &Path) -> Vec<(u32, String)> {
    let variable = format!("MAIL_CONFIG={}", conf.display());
    common::processes()
        .into_iter()
        .filter(|process| process.state() != "Z" && process.started_with(&variable))
        .map(|process| (process.pid, process.read("comm")))
        .collect()
}

/// Live processes whose command line names `dir` (Dovecot's do, by its config file).
fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.display().to_string();
    common::processes()
        .into_iter()
        .map(|process| (process.pid, process.cmdline()))
        .filter(|(_, cmdline)| cmdline.contains(&dir))
        .collect()
}

fn wait_for_postlogd(conf: &Path) -> u32 {
    let postlogd = || {
        instance_processes(conf)
            .into_iter()
            .find_map(|(pid, comm)| (comm == "postlogd").then_some(pid))
    };
    common::poll_for(Duration::from_secs(30), postlogd)
        .unwrap_or_else(|| panic!("no postlogd among {:?}", instance_processes(conf)))
}

#[test]
fn extra_settings_replace_the_defaults_so_no_postfix_daemon_warns() {
    // Four defaults of legacy.sh's main.cf changed, as the open-relay test changes three.
    let settings = [
        "mynetworks = 127.0.0.1/32",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
        "default_transport = discard:extra settings test",
        "biff = yes",
    ];
    let legacy = Legacy::start(&settings.join("\n"), "");
    let main_cf = std::fs::read_to_string(legacy.dir().join("postfix/main.cf")).unwrap();
    for setting in settings {
        let name = setting.split_once(" =").unwrap().0;
        let defined: Vec<&str> = main_cf
            .lines()
            .filter(|line| line.split_once(" =").is_some_and(|(key, _)| key == name))
            .collect();
        assert_eq!(defined, [setting], "{main_cf}");
    }
    // The banners came (start succeeded); postlogd has written the master's first line
    // once it drains, and no daemon warned.
    let read = || std::fs::read_to_string(&legacy.postfix_log).unwrap();
    let log = common::poll_for(Duration::from_secs(30), || {
        Some(read()).filter(|log| log.contains("daemon started"))
    })
    .unwrap_or_else(read);
    assert!(log.contains("postfix/master["), "{log}");
    assert!(log.contains("daemon started"), "{log}");
    assert!(!log.contains("warning:"), "{log}");
}

/// `legacy.sh start` in `dir` with `postfix_extra`, watched: should it wrongly start, the
/// instance ends with this process.
fn start_in(dir: &Path, postfix_extra: &str) -> common::Ran {
    let ports = [(); 3].map(|()| common::free_port());
    common::legacy_start(dir, ports, postfix_extra, "", "")
}

#[test]
fn a_main_cf_postfix_warns_about_is_refused_before_any_daemon_starts() {
    let dir = tempfile::Builder::new()
        .prefix("mailmoat-legacy-")
        .tempdir()
        .unwrap();
    // The refusal names the problem; a warning is quoted in Postfix's own words.
    for (extra, refusal) in [
        (
            "no_such_parameter = 1",
            [
                "legacy.sh: refusing ",
                "unused parameter: no_such_parameter=1",
            ],
        ),
        (
            "  a continuation line",
            [
                "legacy.sh: LEGACY_POSTFIX_EXTRA: not a \"name = value\" line:",
                "line:   a continuation line",
            ],
        ),
    ] {
        let started = start_in(dir.path(), extra);
        assert_eq!(started.code, Some(1), "{}", started.both());
        for words in refusal {
            assert!(started.stderr.contains(words), "{}", started.both());
        }
        assert_eq!(instance_processes(&dir.path().join("postfix")), []);
        assert_eq!(processes_naming(dir.path()), []);
    }
}

#[test]
fn stop_ends_and_leaves_nothing_when_postfix_logging_is_stuck() {
    let legacy = Legacy::start("", "");
    let conf = legacy.dir().join("postfix");
    // Stuck logging, as in the lost CI run: postlogd not draining and its queue full.
    let postlogd = wait_for_postlogd(&conf);
    let stopped = Command::new("kill")
        .args(["-STOP", &postlogd.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    // One more record than the queue holds, and then some: the logger blocks in send.
    let queue: usize = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut logger = Command::new("postlog")
        .arg("-c")
        .arg(&conf)
        .args(["-t", "stuck-logging-test"])
        .env("MAIL_CONFIG", &conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut records = logger.stdin.take().unwrap();
    for n in 0..queue + 10 {
        writeln!(records, "record {n}").unwrap();
    }
    drop(records);
    // Really stuck: blocked in the kernel, waiting for room on the log socket.
    let wchan = std::path::PathBuf::from(format!("/proc/{}/wchan", logger.id()));
    let blocked = common::poll_for(Duration::from_secs(30), || {
        let waiting = std::fs::read_to_string(&wchan).unwrap_or_default();
        if waiting == "unix_wait_for_peer" {
            return Some(Ok(()));
        }
        // An exited logger ends the wait too, with the failure.
        logger.try_wait().unwrap().map(|_| Err(waiting))
    });
    if let Some(Err(_)) | None = blocked {
        let waiting = std::fs::read_to_string(&wchan).unwrap_or_default();
        panic!("postlog is not blocked on the log socket: wchan {waiting:?}");
    }

    let stopped = common::run_bounded(
        &mut common::legacy_command("stop", legacy.dir()),
        LEGACY_SCRIPT_LIMIT,
    );
    assert_eq!(stopped.code, Some(0), "{}", stopped.both());
    assert_eq!(instance_processes(&conf), []);
    // Unblocked (its peer is gone) or killed: either way it has ended.
    common::wait_exit(&mut logger, Duration::from_secs(10));
}
