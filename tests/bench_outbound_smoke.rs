//! A smoke run of the outbound relay's benchmark, `scripts/bench-outbound.sh --quick`
//! (issue 15), with this build's `mailmoat`: the lab comes up, every scenario runs
//! direct and through mailmoat (dane.test and plain.test), every message arrives, and
//! the table has its rows. Nothing here is timed: the numbers of a debug build on a
//! shared machine mean nothing, only that the benchmark runs and loses no mail.
//!
//! In CI (`CI=true`) a missing package fails the test; elsewhere it skips, saying so,
//! as the lab's own tests do (`tests/common/outbound_lab.rs`).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::run_bounded;

/// Far more than a `--quick` run takes (about a minute: the lab's start, four scenarios
/// of three sides, the lab's stop); the script's own watchdog is 20 minutes.
const QUICK_LIMIT: Duration = Duration::from_secs(420);
/// The script's exit code when a program it or the lab needs is missing.
const MISSING_PROGRAM: i32 = 69;
/// The scenarios of a run: message size and sessions at once.
const SCENARIOS: [&str; 4] = ["10kB_s1", "10kB_s8", "1MB_s1", "1MB_s8"];
/// `--quick`'s message counts, by scenario prefix.
const QUICK_COUNTS: [(&str, u32); 2] = [("10kB", 20), ("1MB", 8)];

/// The cells of the table row `| scenario | metric | ... |`, or a failure showing the
/// whole output.
fn row<'a>(stdout: &'a str, scenario: &str, metric: &str) -> Vec<&'a str> {
    let start = format!("| {scenario} | {metric} |");
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&start))
        .unwrap_or_else(|| panic!("no row {start}:\n{stdout}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

fn number(cell: &str) -> f64 {
    cell.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

#[test]
fn a_quick_outbound_benchmark_delivers_every_message_and_prints_its_table() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-outbound.sh");
    let ran = run_bounded(
        Command::new("bash")
            .arg(script)
            .arg("--quick")
            .arg("--mailmoat")
            .arg(env!("CARGO_BIN_EXE_mailmoat")),
        QUICK_LIMIT,
    );
    if ran.code == Some(MISSING_PROGRAM) {
        let advice = "scripts/install-deps.sh, as root, installs what it needs";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "the outbound benchmark cannot run ({advice}):\n{}",
                ran.both()
            );
        }
        // Straight to stderr: the harness would hide an eprintln! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "skipping the outbound benchmark's smoke run ({advice}; in CI this fails): {}",
            ran.stderr.trim()
        );
        return;
    }
    assert_eq!(ran.code, Some(0), "{}", ran.both());
    let out = &ran.stdout;

    assert!(
        out.contains("| scenario | metric | direct | through mailmoat, dane.test | ratio |"),
        "{out}"
    );
    assert!(
        out.contains("one MX connection per transaction (no connection reuse yet)"),
        "{out}"
    );
    assert!(
        out.contains("command: bash scripts/bench-outbound.sh --quick"),
        "{out}"
    );
    for scenario in SCENARIOS {
        let (_, count) = QUICK_COUNTS
            .into_iter()
            .find(|(prefix, _)| scenario.starts_with(prefix))
            .unwrap();
        // direct, dane.test, ratio, plain.test, ratio: every side ran and was measured.
        let rate = row(out, scenario, "messages/s");
        for side in [2, 3, 5] {
            assert!(number(rate[side]) > 0.0, "{rate:?}");
        }
        for metric in ["mailmoat CPU µs/message", "mailmoat peak RSS MiB"] {
            let cells = row(out, scenario, metric);
            assert_eq!(
                cells[2], "-",
                "nothing of mailmoat's in a direct run: {cells:?}"
            );
            assert!(
                number(cells[3]) > 0.0 && number(cells[5]) > 0.0,
                "{cells:?}"
            );
        }
        row(out, scenario, "MX Postfix CPU µs/message");
        row(out, scenario, "resolver (unbound) CPU µs/message");
        let sent = format!("{count} / {count}");
        assert_eq!(
            row(out, scenario, "delivered / sent, all repetitions")[2..],
            [sent.as_str(), &sent, "-", &sent, "-"],
            "every message arrived"
        );
    }
    assert!(!out.contains("RUNS WITH ERRORS"), "{out}");
    assert!(out.contains("0 errors"), "{out}");
}
