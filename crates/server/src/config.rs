//! Server configuration. The CLI fills it from flags, environment and a TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Directory for keys, the embedded database and installed packages.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// `postgres://...` to use PostgreSQL; None for the embedded database in `data_dir`.
    pub database: Option<String>,
    /// Public base URL of the FHIR endpoint, used in `fullUrl`, `Location` and paging links.
    /// Defaults to `http://{listen}/fhir`.
    pub base_url: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Lifetime of issued access tokens, in seconds.
    pub token_ttl_secs: u64,
    /// Pool size for PostgreSQL connections.
    pub pg_pool_size: u32,
    /// Time allowed for in-flight requests to finish on shutdown, in seconds.
    pub shutdown_grace_secs: u64,
    /// What the store is opened for: `Online` for a server, `BulkLoad` only for an
    /// operator's file import (see [`tsunagi_store::Workload`]). Set by the command,
    /// never by a configuration file.
    #[serde(skip)]
    pub workload: tsunagi_store::Workload,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./data"),
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            database: None,
            base_url: None,
            max_body_bytes: 16 * 1024 * 1024,
            token_ttl_secs: 3600,
            pg_pool_size: 16,
            shutdown_grace_secs: 30,
            workload: tsunagi_store::Workload::Online,
        }
    }
}

impl ServerConfig {
    pub fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/fhir", self.listen))
            .trim_end_matches('/')
            .to_string()
    }
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
}
