//! The real `mailmoat` binary, started on free ports with a configuration written for
//! it, logging at trace level to a file, killed on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Certificates, STEP, config_yaml_with, listener_at, poll_for, wait_for};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `mailmoat` binary, logging at trace level to a file, killed on drop.
pub struct Mailmoat {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub log: PathBuf,
    pub config: PathBuf,
    pub ports: HashMap<String, u16>,
}

impl Mailmoat {
    /// Starts the binary with `(name, protocol, tls, policy, upstream)` listeners on free
    /// ports, and waits until every port accepts.
    pub fn start(listeners: &[(&str, &str, &str, &str, SocketAddr)]) -> Mailmoat {
        Self::start_with(listeners, "")
    }

    /// As `start`, with extra top-level YAML (`limits: ...`).
    pub fn start_with(listeners: &[(&str, &str, &str, &str, SocketAddr)], extra: &str) -> Mailmoat {
        Self::start_with_env(listeners, extra, &[])
    }

    /// As `start_with`, with extra environment variables for the process.
    ///
    /// A port `free_port` found free may be taken before mailmoat binds it (another test's
    /// connection can get it as its local port): a start that fails with "Address already
    /// in use" is tried again on new ports, twice at most.
    pub fn start_with_env(
        listeners: &[(&str, &str, &str, &str, SocketAddr)],
        extra: &str,
        env: &[(&str, &str)],
    ) -> Mailmoat {
        for attempt in 1..=3 {
            match Self::try_start(listeners, extra, env) {
                Ok(mailmoat) => return mailmoat,
                Err(failure) if attempt < 3 && failure.contains("Address already in use") => {}
                Err(failure) => panic!("{failure}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn try_start(
        listeners: &[(&str, &str, &str, &str, SocketAddr)],
        extra: &str,
        env: &[(&str, &str)],
    ) -> Result<Mailmoat, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = HashMap::new();
        let mut entries = Vec::new();
        for (name, protocol, tls, policy, upstream) in listeners {
            let port = free_port();
            ports.insert(name.to_string(), port);
            let listen = format!("127.0.0.1:{port}");
            let upstream = upstream.to_string();
            entries.push(listener_at(&listen, name, protocol, tls, policy, &upstream));
        }
        let yaml = config_yaml_with(
            Certificates::Default,
            "log: { level: trace }\n",
            &entries,
            extra,
        );
        let config = dir.path().join("mailmoat.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("mailmoat.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(["run", "-c"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut mailmoat = Mailmoat {
            child,
            _dir: dir,
            log,
            config,
            ports,
        };
        let ports: Vec<u16> = mailmoat.ports.values().copied().collect();
        for port in ports {
            // Listening, or gone: either ends the wait.
            let listening = poll_for(STEP, || {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(true);
                }
                mailmoat.child.try_wait().ok().flatten().map(|_| false)
            });
            if listening != Some(true) {
                let exited = mailmoat.child.try_wait().ok().flatten();
                return Err(format!(
                    "mailmoat did not listen on {port} (exit: {exited:?}); its config:\n{}\nits log:\n{}",
                    std::fs::read_to_string(&mailmoat.config).unwrap_or_default(),
                    std::fs::read_to_string(&mailmoat.log).unwrap_or_default()
                ));
            }
        }
        Ok(mailmoat)
    }

    pub fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits (bounded) until the log holds `count` lines containing `needle`; returns the
    /// last of them.
    pub fn wait_for_log(&self, needle: &str, count: usize) -> String {
        let found = poll_for(STEP, || {
            let text = self.log_text();
            let mut lines = text.lines().filter(|l| l.contains(needle));
            lines.nth(count - 1).map(str::to_owned)
        });
        found.unwrap_or_else(|| panic!("no {needle:?} (x{count}) in the log:\n{}", self.log_text()))
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_for(STEP, "mailmoat to exit", || self.child.try_wait().unwrap())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Mailmoat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
