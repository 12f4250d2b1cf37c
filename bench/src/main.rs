//! mailmoat-bench: a load generator for mailmoat (and, for the baseline, the plaintext
//! upstream behind it) that verifies every reply.
//!
//! Modes: `smtp` (full sessions, M messages each), `latency` (one established session,
//! K timed MAIL/RCPT/DATA/RSET transactions), `imap` (LOGIN, SELECT, FETCH of a large
//! message), `idle` (hold N TLS sessions open and measure the proxy's memory), `flood`
//! (K attackers flood the proxy with lines it answers itself and never read, while
//! full SMTP sessions run through it; the proxy's memory per attacker). With
//! `--proxy-pid` the proxy's CPU time (the run time of its threads from
//! `/proc/PID/task/*/schedstat`; the user/system split from `/proc/PID/stat`'s 10 ms
//! ticks) and resident memory (`VmRSS` from `/proc/PID/status`) are read before and
//! after the run.
//!
//! Output: exactly one JSON line on stdout; problems go to stderr. Exit status 0 only
//! when every session succeeded within `--timeout`; 1 otherwise; 2 on bad arguments.
//! Targets are loopback only.
#![forbid(unsafe_code)]

mod conn;
mod flood;
mod imap;
mod smtp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Load generator for mailmoat: verifies every reply, prints one JSON line.
#[derive(Parser, Debug)]
#[command(name = "mailmoat-bench", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Debug)]
struct Common {
    /// Target address (loopback only): mailmoat's listener, or the upstream for the
    /// direct baseline with `--tls none`.
    #[arg(long, global = true, default_value = "127.0.0.1:25")]
    addr: SocketAddr,
    /// How TLS is reached: STARTTLS, implicit TLS, or none (plaintext, the direct
    /// baseline against the upstream).
    #[arg(long, global = true, value_enum, default_value_t = TlsMode::Starttls)]
    tls: TlsMode,
    /// PEM file with the CA certificate(s) to trust.
    #[arg(long, global = true, conflicts_with = "insecure")]
    ca: Option<std::path::PathBuf>,
    /// Accept any server certificate (handshake signatures are still checked).
    #[arg(long, global = true)]
    insecure: bool,
    /// Server name sent as SNI (and verified with --ca).
    #[arg(long, global = true, default_value = "mail.example.test")]
    sni: String,
    /// Key exchange group the client offers.
    #[arg(long, global = true, value_enum, default_value_t = conn::Kx::X25519)]
    kx: conn::Kx,
    /// Keep a TLS session cache so later sessions resume with tickets.
    #[arg(long, global = true)]
    resume: bool,
    /// Sessions (connections) in total.
    #[arg(long, global = true, default_value_t = 100)]
    sessions: u64,
    /// Sessions in flight at once.
    #[arg(long, global = true, default_value_t = 10)]
    concurrency: u64,
    /// pid of the proxy, to read its CPU time and memory from /proc.
    #[arg(long, global = true)]
    proxy_pid: Option<u32>,
    /// Bound on the whole run, in seconds.
    #[arg(long, global = true, default_value_t = 300)]
    timeout: u64,
    /// Bound on each read, write, connect and handshake, in seconds.
    #[arg(long, global = true, default_value_t = 30)]
    step_timeout: u64,
    /// Runtime worker threads of the generator.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Free-form label copied into the JSON line.
    #[arg(long, global = true, default_value = "")]
    label: String,
}

/// How the client reaches TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMode {
    /// Plaintext first, then STARTTLS.
    Starttls,
    /// TLS from the first byte.
    Implicit,
    /// No TLS at all (direct to a plaintext upstream).
    None,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Full SMTP sessions: EHLO, STARTTLS, EHLO, [AUTH], M x MAIL/RCPT/DATA, QUIT.
    Smtp(SmtpArgs),
    /// One SMTP session (per --sessions) with K timed MAIL/RCPT/DATA/RSET transactions.
    Latency(SmtpArgs),
    /// IMAP sessions: LOGIN, SELECT, FETCH of one message, LOGOUT.
    Imap(ImapArgs),
    /// Holds --sessions SMTP sessions open after TLS and EHLO; reports proxy memory.
    Idle(IdleArgs),
    /// --attackers connections to --flood-addr send lines the proxy answers itself and
    /// never read, while --sessions full SMTP sessions (as `smtp`) run at --addr; reports
    /// the proxy's memory per attacker, held while the attackers stay connected.
    Flood(FloodArgs),
}

#[derive(Args, Debug)]
struct SmtpArgs {
    /// AUTH PLAIN after TLS, as user:password.
    #[arg(long)]
    auth: Option<String>,
    /// Message size in bytes (header included, dot line excluded).
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Messages per session (transactions, in latency mode).
    #[arg(long, default_value_t = 1)]
    messages: u32,
    #[arg(long, default_value = "bench@example.test")]
    from: String,
    #[arg(long, default_value = "sink@example.test")]
    to: String,
    /// Send MAIL, RCPT and DATA in one write and then read their replies, as MTAs do
    /// when the server offers PIPELINING (RFC 2920); without it, one at a time, as
    /// most mail user agents do.
    #[arg(long)]
    pipelining: bool,
}

#[derive(Args, Debug)]
struct ImapArgs {
    /// LOGIN as user:password.
    #[arg(long)]
    login: String,
    #[arg(long, default_value = "INBOX")]
    mailbox: String,
    /// Sequence number of the message to FETCH.
    #[arg(long, default_value_t = 1)]
    message: u64,
    /// FETCHes per session.
    #[arg(long, default_value_t = 1)]
    fetches: u32,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// Seconds to wait after the last session is up before sampling memory.
    #[arg(long, default_value_t = 2)]
    settle: u64,
}

#[derive(Args, Debug)]
struct FloodArgs {
    /// Attacking connections, all at once.
    #[arg(long, default_value_t = 100)]
    attackers: u64,
    /// Where the attackers connect (loopback only): a listener that answers the flood
    /// itself, such as an SMTP MX (`auth_requires_tls`, no pre-TLS command budget).
    #[arg(long)]
    flood_addr: SocketAddr,
    /// Most bytes each attacker sends.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    flood_bytes: u64,
    /// Seconds without write progress after which an attacker counts the proxy as no
    /// longer reading it (and stops writing, its connection held open).
    #[arg(long, default_value_t = 2)]
    stall: u64,
    /// Seconds to wait, attackers held, after the well-behaved sessions before sampling.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    #[command(flatten)]
    smtp: SmtpArgs,
}

/// What one session measured.
#[derive(Default)]
pub struct Outcome {
    /// Message bytes sent (SMTP) or literal bytes received (IMAP).
    pub payload: u64,
    /// Duration of each transaction or FETCH.
    pub transactions: Vec<Duration>,
    /// The TLS handshake resumed a session.
    pub resumed: bool,
    /// TLS version and cipher suite.
    pub suite: Option<String>,
}

/// A peer's bytes, printable and short, for error messages.
pub fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
    format!("{:?}", text)
}

/// Everything collected from the sessions.
#[derive(Default)]
struct Totals {
    ok: u64,
    errors: u64,
    error_samples: Vec<String>,
    payload: u64,
    resumed: u64,
    suites: std::collections::BTreeMap<String, u64>,
    session_times: Vec<Duration>,
    transaction_times: Vec<Duration>,
}

impl Totals {
    fn record(&mut self, result: Result<Outcome>, took: Duration) {
        match result {
            Ok(outcome) => {
                self.ok += 1;
                self.payload += outcome.payload;
                self.resumed += u64::from(outcome.resumed);
                if let Some(suite) = outcome.suite {
                    *self.suites.entry(suite).or_default() += 1;
                }
                self.session_times.push(took);
                self.transaction_times.extend(outcome.transactions);
            }
            Err(e) => self.error(format!("{e:#}")),
        }
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            eprintln!("mailmoat-bench: session failed: {message}");
            self.error_samples.push(message);
        }
    }
}

/// CPU time (utime + stime) of a process, in µs, from `/proc/PID/stat`.
fn cpu_us(pid: &str) -> Option<u64> {
    cpu_split_us(pid).map(|(user, system)| user + system)
}

/// (user, system) CPU time of a process, in µs, from `/proc/PID/stat`.
fn cpu_split_us(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: "state ppid ...";
    // utime and stime are fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on (the kernel converts).
    Some((utime * 10_000, stime * 10_000))
}

/// Time the threads of a process have run, in µs, with their thread ids: the sum of
/// `/proc/PID/task/*/schedstat` (nanoseconds, where `/proc/PID/stat` counts 10 ms units).
/// Exact for a process that is waiting when it is read, as the proxy is between runs.
fn run_time_us(pid: &str) -> Option<(u64, Vec<u64>)> {
    let mut total_ns = 0u64;
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let entry = entry.ok()?;
        let schedstat = std::fs::read_to_string(entry.path().join("schedstat")).ok()?;
        total_ns += schedstat.split(' ').next()?.parse::<u64>().ok()?;
        tids.push(entry.file_name().to_str()?.parse().ok()?);
    }
    tids.sort_unstable();
    Some((total_ns / 1000, tids))
}

/// Counters of this network namespace (`TcpExt:` in `/proc/net/netstat`) that show
/// connections lost in a full listen queue: with SYN cookies, a server-speaks-first
/// client whose final ACK is dropped waits for a greeting that never comes.
const TCP_EXT_COUNTERS: &[&str] = &[
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "TCPReqQFullDoCookies",
];

fn tcp_ext() -> Option<Vec<u64>> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let names: Vec<&str> = names.split(' ').collect();
    let values: Vec<&str> = values.split(' ').collect();
    TCP_EXT_COUNTERS
        .iter()
        .map(|counter| {
            let at = names.iter().position(|n| n == counter)?;
            values.get(at)?.parse().ok()
        })
        .collect()
}

/// Resident memory of a process, in KiB, from `/proc/PID/status`.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// (p50, p90, p99, max, mean) in µs.
fn percentiles(samples: &mut [Duration]) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::Value::Null;
    }
    samples.sort_unstable();
    let at = |p: f64| {
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1].as_micros() as u64
    };
    let mean = samples.iter().map(Duration::as_micros).sum::<u128>() / samples.len() as u128;
    let over_35ms = samples
        .iter()
        .filter(|d| **d >= Duration::from_millis(35))
        .count();
    json!({
        "count": samples.len(),
        "p50": at(50.0), "p90": at(90.0), "p99": at(99.0),
        "max": samples[samples.len() - 1].as_micros() as u64,
        "mean": mean as u64,
        "over_35ms": over_35ms,
    })
}

fn main() {
    let cli = Cli::parse();
    if !cli.common.addr.ip().is_loopback() {
        eprintln!(
            "mailmoat-bench: --addr {} is not a loopback address; refusing",
            cli.common.addr
        );
        std::process::exit(2);
    }
    if cli.common.tls != TlsMode::None && cli.common.ca.is_none() && !cli.common.insecure {
        eprintln!("mailmoat-bench: TLS needs --ca FILE or --insecure");
        std::process::exit(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mailmoat-bench: runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(report) => {
            let failed = report["errors"].as_u64() != Some(0)
                || report["timed_out"].as_bool() != Some(false);
            println!("{report}");
            std::process::exit(i32::from(failed));
        }
        Err(e) => {
            eprintln!("mailmoat-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli) -> Result<serde_json::Value> {
    let common = &cli.common;
    let step = Duration::from_secs(common.step_timeout.max(1));
    let tls = match common.tls {
        TlsMode::None => None,
        _ => Some(conn::Tls::new(
            common.ca.as_deref(),
            &common.sni,
            common.kx,
            common.resume,
        )?),
    };
    let proxy = common.proxy_pid.map(|p| p.to_string());
    let self_cpu_before = cpu_us("self");
    let proxy_cpu_before = proxy.as_deref().and_then(cpu_split_us);
    let proxy_run_time_before = proxy.as_deref().and_then(run_time_us);
    let proxy_rss_before = proxy.as_deref().and_then(rss_kib);
    if proxy.is_some() && (proxy_cpu_before.is_none() || proxy_rss_before.is_none()) {
        bail!(
            "cannot read /proc/{}/stat and status",
            proxy.unwrap_or_default()
        );
    }
    let tcp_ext_before = tcp_ext();
    let started = Instant::now();
    let deadline = Duration::from_secs(common.timeout.max(1));

    let mode_name;
    let mut extra = serde_json::Map::new();
    let mut attackers_total = 0u64;
    let (mut totals, timed_out, idle_rss) = match &cli.mode {
        Mode::Smtp(args) | Mode::Latency(args) => {
            let latency = matches!(cli.mode, Mode::Latency(_));
            mode_name = if latency { "latency" } else { "smtp" };
            let auth = match &args.auth {
                None => None,
                Some(s) => match s.split_once(':') {
                    Some((u, p)) => Some((u.to_owned(), p.to_owned())),
                    None => bail!("--auth wants user:password"),
                },
            };
            let body = Arc::new(smtp::body(args.size));
            extra.insert("message_bytes".into(), json!(body.len()));
            extra.insert("messages_per_session".into(), json!(args.messages));
            extra.insert("auth".into(), json!(auth.is_some()));
            extra.insert("pipelining".into(), json!(args.pipelining));
            let plan = Arc::new(smtp::Plan {
                tls_mode: common.tls,
                tls,
                step,
                auth,
                body,
                messages: args.messages,
                from: args.from.clone(),
                to: args.to.clone(),
                rset: latency,
                pipelining: args.pipelining,
            });
            let addr = common.addr;
            let (totals, timed_out) = drive(common, deadline, move |_| {
                let plan = Arc::clone(&plan);
                async move {
                    let mut out = Outcome::default();
                    smtp::session(addr, &plan, &mut out).await.map(|()| out)
                }
            })
            .await;
            (totals, timed_out, None)
        }
        Mode::Imap(args) => {
            mode_name = "imap";
            let Some((user, password)) = args.login.split_once(':') else {
                bail!("--login wants user:password");
            };
            let plan = Arc::new(imap::Plan {
                tls_mode: common.tls,
                tls,
                step,
                user: user.to_owned(),
                password: password.to_owned(),
                mailbox: args.mailbox.clone(),
                message: args.message,
                fetches: args.fetches,
            });
            extra.insert("fetches_per_session".into(), json!(args.fetches));
            let addr = common.addr;
            let (totals, timed_out) = drive(common, deadline, move |_| {
                let plan = Arc::clone(&plan);
                async move {
                    let mut out = Outcome::default();
                    imap::session(addr, &plan, &mut out).await.map(|()| out)
                }
            })
            .await;
            (totals, timed_out, None)
        }
        Mode::Idle(args) => {
            mode_name = "idle";
            let plan = Arc::new(smtp::Plan {
                tls_mode: common.tls,
                tls,
                step,
                auth: None,
                body: Arc::new(Vec::new()),
                messages: 0,
                from: String::new(),
                to: String::new(),
                rset: false,
                pipelining: false,
            });
            let held = Arc::new(Mutex::new(Vec::new()));
            let keep = Arc::clone(&held);
            let addr = common.addr;
            let (totals, timed_out) = drive(common, deadline, move |_| {
                let plan = Arc::clone(&plan);
                let keep = Arc::clone(&keep);
                async move {
                    let (mut c, negotiated) = smtp::open(addr, &plan).await?;
                    smtp::hello(&mut c, &plan).await?;
                    c.shrink();
                    if let Ok(mut held) = keep.lock() {
                        held.push(c);
                    }
                    Ok(Outcome {
                        resumed: negotiated.resumed,
                        suite: negotiated.suite,
                        ..Outcome::default()
                    })
                }
            })
            .await;
            tokio::time::sleep(Duration::from_secs(args.settle)).await;
            let rss = proxy.as_deref().and_then(rss_kib);
            let open = held.lock().map(|h| h.len()).unwrap_or(0);
            extra.insert("held_open".into(), json!(open));
            // Closing 5,000 sessions politely would measure QUIT; dropping is enough.
            if let Ok(mut held) = held.lock() {
                held.clear();
            }
            (totals, timed_out, rss)
        }
        Mode::Flood(args) => {
            mode_name = "flood";
            if !args.flood_addr.ip().is_loopback() {
                bail!("--flood-addr {} is not a loopback address", args.flood_addr);
            }
            let body = Arc::new(smtp::body(args.smtp.size));
            let plan = Arc::new(smtp::Plan {
                tls_mode: common.tls,
                tls,
                step,
                auth: None,
                body,
                messages: args.smtp.messages,
                from: args.smtp.from.clone(),
                to: args.smtp.to.clone(),
                rset: false,
                pipelining: args.smtp.pipelining,
            });
            // The attackers first, all at once; the sessions run while they flood.
            let mut flooders = tokio::task::JoinSet::new();
            for _ in 0..args.attackers {
                flooders.spawn(flood::attacker(
                    args.flood_addr,
                    args.flood_bytes,
                    Duration::from_secs(args.stall.max(1)),
                    step,
                ));
            }
            let addr = common.addr;
            let (totals, sessions_timed_out) = drive(common, deadline, move |_| {
                let plan = Arc::clone(&plan);
                async move {
                    let mut out = Outcome::default();
                    smtp::session(addr, &plan, &mut out).await.map(|()| out)
                }
            })
            .await;
            let mut held = Vec::new();
            let (mut stalled, mut closed, mut bytes, mut failed) = (0u64, 0u64, 0u64, 0u64);
            let collected = tokio::time::timeout(deadline, async {
                while let Some(joined) = flooders.join_next().await {
                    match joined {
                        Ok(Ok((stream, attack))) => {
                            stalled += u64::from(attack.stalled);
                            closed += u64::from(attack.closed);
                            bytes += attack.bytes;
                            if !attack.closed {
                                held.push(stream);
                            }
                        }
                        Ok(Err(e)) => {
                            failed += 1;
                            eprintln!("mailmoat-bench: attacker failed: {e:#}");
                        }
                        Err(e) => {
                            failed += 1;
                            eprintln!("mailmoat-bench: attacker task failed: {e}");
                        }
                    }
                }
            })
            .await;
            flooders.abort_all();
            tokio::time::sleep(Duration::from_secs(args.settle)).await;
            let rss = proxy.as_deref().and_then(rss_kib);
            attackers_total = args.attackers;
            extra.insert("attackers".into(), json!(args.attackers));
            extra.insert("attackers_held_open".into(), json!(held.len()));
            extra.insert("attackers_stalled".into(), json!(stalled));
            extra.insert("attackers_closed".into(), json!(closed));
            extra.insert("attackers_failed".into(), json!(failed));
            extra.insert("attacker_bytes".into(), json!(bytes));
            extra.insert(
                "attacker_bytes_mean".into(),
                json!(bytes / args.attackers.max(1)),
            );
            extra.insert("flood_bytes_limit".into(), json!(args.flood_bytes));
            drop(held);
            (totals, sessions_timed_out || collected.is_err(), rss)
        }
    };
    let elapsed = started.elapsed();
    let elapsed_s = elapsed.as_secs_f64().max(1e-9);
    let self_cpu = cpu_us("self")
        .zip(self_cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    let sessions = common.sessions;
    let per = |total: Option<u64>, n: u64| total.filter(|_| n > 0).map(|t| t as f64 / n as f64);
    let mb = totals.payload as f64 / 1e6;

    let proxy_json = match (&proxy, proxy_cpu_before, proxy_rss_before) {
        (Some(pid), Some((user_before, system_before)), Some(rss_before)) => {
            let split = cpu_split_us(pid).map(|(user, system)| {
                (
                    user.saturating_sub(user_before),
                    system.saturating_sub(system_before),
                )
            });
            // The exact run time, unless a thread came or went during the run (its time
            // would be missing from one of the sums): then the 10 ms ticks.
            let exact = match (proxy_run_time_before, run_time_us(pid)) {
                (Some((before, tids_before)), Some((after, tids_after)))
                    if tids_before == tids_after =>
                {
                    Some(after.saturating_sub(before))
                }
                _ => None,
            };
            let cpu = exact.or(split.map(|(user, system)| user + system));
            let rss_after = idle_rss.or_else(|| rss_kib(pid));
            let mut p = json!({
                "pid": pid,
                "cpu_us": cpu,
                "cpu_source": if exact.is_some() { "schedstat" } else { "stat" },
                "cpu_user_us": split.map(|s| s.0),
                "cpu_system_us": split.map(|s| s.1),
                "cpu_us_per_session": per(cpu, totals.ok),
                "cpu_ms_per_mb": cpu.filter(|_| mb > 0.0).map(|c| c as f64 / 1000.0 / mb),
                "rss_kib_before": rss_before,
                "rss_kib_after": rss_after,
            });
            if mode_name == "idle" {
                p["rss_kib_per_conn"] = json!(
                    rss_after
                        .filter(|_| totals.ok > 0)
                        .map(|a| (a as f64 - rss_before as f64) / totals.ok as f64)
                );
            }
            if mode_name == "flood" {
                // Sampled after the sessions ended, the attackers still connected (unless
                // the proxy closed them): the growth over all K attackers.
                p["rss_kib_per_attacker"] = json!(
                    rss_after
                        .filter(|_| attackers_total > 0)
                        .map(|a| (a as f64 - rss_before as f64) / attackers_total as f64)
                );
            }
            p
        }
        _ => serde_json::Value::Null,
    };
    let transactions = percentiles(&mut totals.transaction_times);
    let mut report = json!({
        "mode": mode_name,
        "label": common.label,
        "addr": common.addr.to_string(),
        "tls": format!("{:?}", common.tls).to_lowercase(),
        "kx": format!("{:?}", common.kx).to_lowercase(),
        "resume": common.resume,
        "sessions": sessions,
        "concurrency": common.concurrency,
        "ok": totals.ok,
        "errors": totals.errors,
        "error_samples": totals.error_samples,
        "timed_out": timed_out,
        "resumed": totals.resumed,
        "tls_suites": totals.suites,
        "elapsed_s": elapsed_s,
        "sessions_per_s": totals.ok as f64 / elapsed_s,
        "bytes": totals.payload,
        "mb_per_s": mb / elapsed_s,
        "session_latency_us": percentiles(&mut totals.session_times),
        "transaction_latency_us": transactions,
        "proxy": proxy_json,
        "tcp_ext": tcp_ext().zip(tcp_ext_before).map(|(after, before)| {
            TCP_EXT_COUNTERS
                .iter()
                .zip(after.iter().zip(before))
                .map(|(name, (a, b))| (name.to_string(), json!(a.saturating_sub(b))))
                .collect::<serde_json::Map<_, _>>()
        }),
        "generator": {
            "cpu_us": self_cpu,
            "cpu_us_per_session": per(self_cpu, totals.ok),
        },
    });
    if let Some(map) = report.as_object_mut() {
        map.extend(extra);
    }
    Ok(report)
}

/// Runs `--sessions` sessions, `--concurrency` at a time, within `deadline`. Sessions
/// not finished by then count as errors.
async fn drive<F, Fut>(common: &Common, deadline: Duration, session: F) -> (Totals, bool)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Outcome>> + Send + 'static,
{
    let total = common.sessions;
    let next = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let session = Arc::new(session);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..common.concurrency.clamp(1, total.max(1)) {
        let next = Arc::clone(&next);
        let totals = Arc::clone(&totals);
        let session = Arc::clone(&session);
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let started = Instant::now();
                let result = session(i).await;
                if let Ok(mut totals) = totals.lock() {
                    totals.record(result, started.elapsed());
                }
            }
        });
    }
    let timed_out = tokio::time::timeout(deadline, async {
        while let Some(joined) = workers.join_next().await {
            if let Err(e) = joined
                && let Ok(mut totals) = totals.lock()
            {
                totals.error(format!("worker failed: {e}"));
            }
        }
    })
    .await
    .is_err();
    workers.abort_all();
    let mut totals = match Arc::try_unwrap(totals) {
        Ok(mutex) => mutex.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(shared) => std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner())),
    };
    let unfinished = total.saturating_sub(totals.ok + totals.errors);
    if unfinished > 0 {
        totals.error(format!(
            "{unfinished} sessions unfinished after {deadline:?} (--timeout)"
        ));
        totals.errors += unfinished - 1;
    }
    (totals, timed_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let p = percentiles(&mut samples);
        assert_eq!(p["p50"], 50);
        assert_eq!(p["p99"], 99);
        assert_eq!(p["max"], 100);
        assert_eq!(p["over_35ms"], 0);
        assert!(percentiles(&mut []).is_null());
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        assert_eq!(tcp_ext().map(|c| c.len()), Some(TCP_EXT_COUNTERS.len()));
        assert!(cpu_us("self").is_some());
        assert!(rss_kib("self").is_some_and(|kib| kib > 0));
    }

    #[test]
    fn run_time_sums_every_thread_of_the_process() {
        fn this_thread() -> u64 {
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            link.file_name().unwrap().to_str().unwrap().parse().unwrap()
        }
        let pid = std::process::id().to_string();
        let (before, tids) = run_time_us(&pid).unwrap();
        assert!(tids.contains(&this_thread()), "{tids:?}");
        assert!(tids.contains(&u64::from(std::process::id())), "{tids:?}");
        // A thread started after the first read is in the next one: the caller sees the
        // ids change, and knows a sum is missing that thread's time.
        let (spawned, tids_during) = std::thread::scope(|scope| {
            let (ready, wait) = std::sync::mpsc::channel();
            let (done, finish) = std::sync::mpsc::channel::<()>();
            scope.spawn(move || {
                ready.send(this_thread()).unwrap();
                finish.recv().ok();
            });
            let spawned = wait.recv().unwrap();
            let (_, during) = run_time_us(&pid).unwrap();
            drop(done);
            (spawned, during)
        });
        assert!(!tids.contains(&spawned));
        assert!(
            tids_during.contains(&spawned),
            "{spawned} not in {tids_during:?}"
        );
        assert!(before > 0);
    }
}
