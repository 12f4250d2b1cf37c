//! The proxy under test, in-process: the library's own `Server` on 127.0.0.1:0, its
//! log lines captured, stopped when the handle drops.

use std::collections::HashMap;
use std::net::SocketAddr;

use mailmoat::config::Config;
use mailmoat::inbound::listener::Server;
use tokio::sync::watch;

use super::{Certificates, capture_logs, config_yaml};

/// The proxy, running in-process with its listeners on 127.0.0.1:0.
pub struct Proxy {
    pub addrs: HashMap<String, SocketAddr>,
    _stop: watch::Sender<bool>,
}

impl Proxy {
    /// Starts the proxy with this whole configuration.
    pub async fn start(yaml: &str) -> Proxy {
        capture_logs();
        let config = Config::from_yaml(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let server = Server::bind(&config).await.unwrap();
        let addrs = server.local_addrs().into_iter().collect();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(server.run(stopped));
        Proxy { addrs, _stop: stop }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }
}

/// Starts the proxy with both test certificates, these `listeners:` entries (YAML flow
/// maps, one per line) and any extra top-level YAML.
pub async fn proxy(listeners: &[String], extra: &str) -> Proxy {
    Proxy::start(&config_yaml(Certificates::Both, listeners, extra)).await
}
