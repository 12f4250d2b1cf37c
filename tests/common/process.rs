//! Programs run to completion under a bound (output through files, never pipes), and the
//! machine's processes as /proc shows them.

use std::path::PathBuf;
use std::time::Duration;

use super::poll_for;

/// Runs a program to completion (bounded), returning (exit code, stdout, stderr).
pub fn run_program(program: &str, args: &[&str]) -> (i32, String, String) {
    let ran = run_bounded(
        std::process::Command::new(program).args(args),
        Duration::from_secs(180),
    );
    (ran.code.unwrap_or(-1), ran.stdout, ran.stderr)
}

/// Waits for `child` to exit, for at most `limit`; past it the child is killed and the
/// test fails.
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    if let Some(status) = poll_for(limit, || child.try_wait().unwrap()) {
        return status;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("process {} still running after {limit:?}", child.id());
}

/// What a program run by [`run_bounded`] left behind.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn both(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `command` to completion within `limit`, its stdin empty. Output goes through
/// files, never pipes: a daemon the program leaves behind holding its stdout cannot
/// make the wait endless, and a chatty program cannot block on a full pipe. On timeout
/// the test fails naming what the program's process group was doing, and the group is
/// killed.
pub fn run_bounded(command: &mut std::process::Command, limit: Duration) -> Ran {
    run_within(command, limit).unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

/// [`run_bounded`], with the timeout as an error (for `Drop`, which must not panic).
pub fn run_within(command: &mut std::process::Command, limit: Duration) -> Result<Ran, String> {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let program = format!("{command:?}");
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} could not start ({e}): run scripts/install-deps.sh as root")
        });
    let read = |path: &std::path::Path| {
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    };
    let Some(status) = poll_for(limit, || child.try_wait().unwrap()) else {
        let group = process_group(child.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();
        // The program itself, should kill(1) be missing or fail.
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{program} ran longer than {limit:?}; its processes were:\n{group}\
             stdout:\n{}\nstderr:\n{}",
            read(&out),
            read(&err)
        ));
    };
    Ok(Ran {
        code: status.code(),
        stdout: read(&out),
        stderr: read(&err),
    })
}

/// A live process, as /proc shows it.
pub struct Process {
    pub pid: u32,
    /// The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ...
    stat: Vec<String>,
    dir: PathBuf,
}

impl Process {
    /// `R`, `S`, `D`, `T`, `Z`...
    pub fn state(&self) -> &str {
        &self.stat[0]
    }

    pub fn group(&self) -> Option<u32> {
        self.stat.get(2)?.parse().ok()
    }

    /// The arguments, joined by spaces (empty for a zombie).
    pub fn cmdline(&self) -> String {
        std::fs::read(self.dir.join("cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether it was started with `variable` (`NAME=value`) in its environment.
    pub fn started_with(&self, variable: &str) -> bool {
        std::fs::read(self.dir.join("environ"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .any(|entry| entry == variable.as_bytes())
    }

    /// A /proc/PID file such as `comm` or `wchan`, trimmed (empty if unreadable).
    pub fn read(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.trim().to_owned()
    }
}

/// Every process on the machine, zombies included.
pub fn processes() -> Vec<Process> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = entry.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": the fields after the last ')'.
        let stat: Vec<String> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if !stat.is_empty() {
            found.push(Process { pid, stat, dir });
        }
    }
    found
}

/// Every process of process group `group`, one per line: pid, state, what it waits in
/// and its command line.
fn process_group(group: u32) -> String {
    let mut lines = String::new();
    for process in processes() {
        if process.group() == Some(group) {
            lines.push_str(&format!(
                "  {} {} {} {}\n",
                process.pid,
                process.state(),
                process.read("wchan"),
                process.cmdline()
            ));
        }
    }
    lines
}
