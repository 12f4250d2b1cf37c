//! GNU Mailutils 3.15's `imap4d` and `pop3d` (Debian 12's `mailutils-imap4d` and
//! `mailutils-pop3d`, installed by `scripts/install-deps.sh`) as legacy upstreams:
//! plaintext only, LOGIN, AUTHENTICATE and USER/PASS accepted without TLS. A missing
//! imap4d or pop3d fails the test, never skips it.
//!
//! **How they run.** Each in `--inetd` mode behind a small accept loop of this module on
//! a free loopback port: every connection gets a process of its own (in a process group
//! of its own), its socket as stdin and stdout and, as stderr, a log file named after the
//! connection's remote port. With `transcript yes` that log holds every line the server
//! read as a command (`imap4d: C: a NOOP`, passwords shown as `***`), every reply
//! (`S: ...`) and every login (`user `bob' logged in`, `POP3 login: user `bob'`), so a
//! test ties what the server did to one upstream leg exactly (the port the recording
//! forwarder's leg names). The daemon mode (`--daemon --foreground`) logs only the
//! client's IP address, never its port. Nothing binds 143 or 110; the config file is the
//! instance's own (`--config-file`, which implies no site-wide configuration).
//!
//! **How users log in.** Through Mailutils' own `virtdomain` module, not PAM or system
//! accounts: `alice@example.test` and `bob@example.test` are lines of a passwd-format
//! file in the instance's directory (`virtdomain/example.test`, SHA-512 crypt hashes
//! checked by the `generic` authentication module). Nothing on the machine changes (no
//! `useradd`, no `/etc/pam.d` file, no password in `/etc/shadow`), so any number of
//! instances run side by side as root on a fresh machine, and nothing is left behind. A
//! logged-in session drops root for the uid and gid of `nobody`, which owns the users'
//! home directories (each with an empty mbox `INBOX`).
//!
//! **Bounded.** Every session ends at the server's own idle timeout (60 s), when its
//! connection closes (which the end of the test process does), or when the instance is
//! dropped: then the accept loop stops and every session's process group is killed.
//!
//! Mailutils 3.15 quirk: `tls-mode false;` at the top level makes the inetd server demand
//! a certificate ("server <inetd>: no certificate set"); with no `tls-mode` and no
//! certificate it runs without TLS, as wanted.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The test user of every instance; logs in after TLS.
pub const USER: &str = "alice@example.test";
pub const PASSWORD: &str = "alice-secret-pw";
/// The user an attack hides a login of; must never log in through mailmoat.
pub const HIDDEN_USER: &str = "bob@example.test";
pub const HIDDEN_PASSWORD: &str = "bob-secret-pw";

/// `openssl passwd -6 -salt mailmoat.test alice-secret-pw` (and `bob-secret-pw`).
const ALICE_HASH: &str = "$6$mailmoat.test$AmJLrBcquPREF6jTTOiluMI/E4/ZhMnxl2DN6JIadH2q7fcpgXLMd/u2rHu15I.lubt/na/Icfj99Ao00jihC0";
const BOB_HASH: &str = "$6$mailmoat.test$5G.gWzHCs4VmKtsjt/0UiNlICC1TBNIjIsHr0nfJcZnKwxSI7zNeQL6Jvbf/QPzyjNw0wTu.KD4I.Uo/POIwF0";

/// How long a session may sit idle before the server ends it (its `timeout`).
const IDLE_TIMEOUT_SECS: u64 = 60;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    Imap4d,
    Pop3d,
}

impl Program {
    pub fn name(self) -> &'static str {
        match self {
            Program::Imap4d => "imap4d",
            Program::Pop3d => "pop3d",
        }
    }

    /// Where Debian's package puts it (so a `PATH` without /usr/sbin finds it too).
    pub fn path(self) -> &'static str {
        match self {
            Program::Imap4d => "/usr/sbin/imap4d",
            Program::Pop3d => "/usr/sbin/pop3d",
        }
    }
}

/// imap4d and pop3d, each behind an accept loop of its own; stopped when dropped.
pub struct Mailutils {
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    imap_loop: AcceptLoop,
    pop3_loop: AcceptLoop,
    dir: tempfile::TempDir,
}

impl Mailutils {
    /// A private instance on free loopback ports.
    pub fn start() -> Mailutils {
        for program in [Program::Imap4d, Program::Pop3d] {
            let found = Command::new(program.path())
                .arg("--version")
                .stdin(Stdio::null())
                .output();
            let version = found
                .as_ref()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default();
            assert!(
                version.starts_with(&format!("{} (GNU Mailutils) 3.15", program.name())),
                "no GNU Mailutils 3.15 {} ({found:?}): run scripts/install-deps.sh as root",
                program.path()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("mailmoat-mailutils-")
            .tempdir()
            .unwrap();
        let (uid, gid) = nobody();
        let root = dir.path();
        // nobody must reach the home directories below.
        set_mode(root, 0o755);
        for sub in ["log", "virtdomain", "home"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        let mut passwd = String::new();
        for (name, hash) in [("alice", ALICE_HASH), ("bob", BOB_HASH)] {
            let home = root.join("home").join(name);
            std::fs::create_dir(&home).unwrap();
            std::fs::write(home.join("INBOX"), "").unwrap();
            for path in [&home, &home.join("INBOX")] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| {
                    panic!(
                        "chown {} to nobody ({e}): the tests run as root",
                        path.display()
                    )
                });
            }
            passwd.push_str(&format!(
                "{name}:{hash}:{uid}:{gid}:{name}:{}:/usr/sbin/nologin\n",
                home.display()
            ));
        }
        let passwd_file = root.join("virtdomain/example.test");
        std::fs::write(&passwd_file, passwd).unwrap();
        set_mode(&passwd_file, 0o600);
        let config = format!(
            "# GNU Mailutils for mailmoat's tests (tests/common/mailutils.rs): --inetd, one\n\
             # process per connection, no TLS, users from the virtdomain file below.\n\
             logging {{ syslog no; }}\n\
             auth {{ authorization virtdomain; authentication generic; }}\n\
             virtdomain {{ passwd-dir \"{}\"; }}\n\
             tcp-wrappers {{ enable no; }}\n\
             transcript yes;\n\
             timeout {IDLE_TIMEOUT_SECS};\n",
            root.join("virtdomain").display()
        );
        let config_file = root.join("mailutils.conf");
        std::fs::write(&config_file, config).unwrap();
        for program in [Program::Imap4d, Program::Pop3d] {
            let lint = super::run_bounded(
                Command::new(program.path())
                    .arg(format!("--config-file={}", config_file.display()))
                    .arg("--config-lint"),
                Duration::from_secs(20),
            );
            assert_eq!(lint.code, Some(0), "{}", lint.both());
        }
        let imap_loop = AcceptLoop::start(Program::Imap4d, &config_file, &root.join("log"));
        let pop3_loop = AcceptLoop::start(Program::Pop3d, &config_file, &root.join("log"));
        Mailutils {
            imap: imap_loop.addr,
            pop3: pop3_loop.addr,
            imap_loop,
            pop3_loop,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn accept_loop(&self, program: Program) -> &AcceptLoop {
        match program {
            Program::Imap4d => &self.imap_loop,
            Program::Pop3d => &self.pop3_loop,
        }
    }

    /// The log of the session whose connection came from loopback `port` (the
    /// recording forwarder's `upstream_port`, or a direct client's local port), so far;
    /// the latest such session, should a port have come round again.
    pub fn session_log(&self, program: Program, port: u16) -> String {
        self.accept_loop(program)
            .log_path(port)
            .map(|path| {
                String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
            })
            .unwrap_or_default()
    }

    /// The session's log once its process has exited, when it holds everything the
    /// session did. Waits at most [`super::STEP`]; past that, the log so far with a last
    /// line saying so (the caller's checks then report what is wrong, all at once).
    pub fn finished_session_log(&self, program: Program, port: u16) -> String {
        let exited = self.accept_loop(program).wait_exited(port);
        let mut log = self.session_log(program, port);
        if !exited {
            log.push_str(&format!(
                "<the session from port {port} had not ended after {:?}>\n",
                super::STEP
            ));
        }
        log
    }
}

/// The command lines a session's log shows the server read (`C: ...`), in order.
pub fn commands(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| line.split_once(": C: ").map(|(_, command)| command))
        .map(str::to_owned)
        .collect()
}

/// The users a session's log shows logged in, one entry per login: imap4d logs
/// ``user `bob' logged in (source: virtdomain)``, pop3d ``POP3 login: user `bob', source
/// virtdomain`` (and then a second line, ``user `bob' logged in with mailbox ...``,
/// which is not counted).
pub fn logins(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let (_, rest) = line
                .split_once("POP3 login: user `")
                .or_else(|| line.split_once(": user `"))?;
            let (user, after) = rest.split_once('\'')?;
            (line.contains("POP3 login: ") || after.starts_with(" logged in (source:"))
                .then(|| user.to_owned())
        })
        .collect()
}

/// The uid and gid of `nobody`, from /etc/passwd.
fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"nobody") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .expect("no user nobody in /etc/passwd")
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// One connection's server process.
struct Session {
    /// The port the connection came from.
    port: u16,
    log: PathBuf,
    child: Child,
}

/// Accepts on a free loopback port and runs `PROGRAM --inetd` on each connection.
struct AcceptLoop {
    addr: SocketAddr,
    sessions: Arc<Mutex<Vec<Session>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AcceptLoop {
    fn start(program: Program, config_file: &Path, log_dir: &Path) -> AcceptLoop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions: Arc<Mutex<Vec<Session>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let config_arg = format!("--config-file={}", config_file.display());
        let thread = {
            let (sessions, stop, log_dir) =
                (Arc::clone(&sessions), Arc::clone(&stop), log_dir.to_owned());
            std::thread::spawn(move || {
                let mut accepted = 0u32;
                loop {
                    let accepted_one = listener.accept();
                    // Drop wakes the accept with a connection of its own after `stop`.
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok((stream, peer)) = accepted_one else {
                        continue;
                    };
                    accepted += 1;
                    let log = log_dir.join(format!(
                        "{}-{accepted}-from-{}.log",
                        program.name(),
                        peer.port()
                    ));
                    let (Ok(()), Ok(file), Ok(output)) = (
                        stream.set_nonblocking(false),
                        std::fs::File::create(&log),
                        stream.try_clone(),
                    ) else {
                        continue;
                    };
                    let child = Command::new(program.path())
                        .arg("--inetd")
                        .arg(&config_arg)
                        .stdin(Stdio::from(OwnedFd::from(stream)))
                        .stdout(Stdio::from(OwnedFd::from(output)))
                        .stderr(file)
                        .process_group(0)
                        .spawn();
                    // The loop's copies of the socket went with the Stdio values: the
                    // connection ends when the server closes it.
                    if let Ok(child) = child {
                        sessions.lock().unwrap().push(Session {
                            port: peer.port(),
                            log,
                            child,
                        });
                    }
                }
            })
        };
        AcceptLoop {
            addr,
            sessions,
            stop,
            thread: Some(thread),
        }
    }

    /// The log of the latest session from `port`, if one was accepted.
    fn log_path(&self, port: u16) -> Option<PathBuf> {
        let sessions = self.sessions.lock().unwrap();
        let session = sessions.iter().rev().find(|session| session.port == port)?;
        Some(session.log.clone())
    }

    /// Waits, at most [`super::STEP`], for the latest session from `port` to have been
    /// accepted and its process to have exited; whether it did.
    fn wait_exited(&self, port: u16) -> bool {
        super::poll_for(super::STEP, || {
            let mut sessions = self.sessions.lock().unwrap();
            sessions
                .iter_mut()
                .rev()
                .find(|session| session.port == port)
                .is_some_and(|session| session.child.try_wait().ok().flatten().is_some())
                .then_some(())
        })
        .is_some()
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for session in sessions.iter_mut() {
            let child = &mut session.child;
            if child.try_wait().ok().flatten().is_none() {
                // The whole group: the session's process and anything it started.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
