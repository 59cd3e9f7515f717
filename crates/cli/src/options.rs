//! Configuration from flags, environment and a TOML file (in that order of precedence).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tsunagi_server::ServerConfig;
use tsunagi_store::{Store, Workload};

/// Where the data lives. Shared by every command that opens the database.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data directory: server key, embedded database, installed packages.
    #[arg(long, env = "TSUNAGI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://...); without it the embedded database in the data directory is used.
    #[arg(long, env = "TSUNAGI_DATABASE")]
    pub database: Option<String>,
    /// TOML configuration file (keys as in ServerConfig: data_dir, listen, database, base_url, max_body_bytes, ...).
    #[arg(long, env = "TSUNAGI_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Server flags.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, env = "TSUNAGI_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Public base URL of the FHIR endpoint (default http://LISTEN/fhir).
    #[arg(long, env = "TSUNAGI_BASE_URL")]
    pub base_url: Option<String>,
    /// Largest request body in bytes (default 16 MiB).
    #[arg(long, env = "TSUNAGI_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
}

impl DataArgs {
    /// The configuration: TOML file, then environment and flags on top.
    pub fn load(&self) -> anyhow::Result<ServerConfig> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => ServerConfig::default(),
        };
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(db) = &self.database {
            cfg.database = Some(db.clone());
        }
        Ok(cfg)
    }

    pub fn open(&self) -> anyhow::Result<(ServerConfig, Arc<dyn Store>)> {
        self.open_for(Workload::Online)
    }

    /// Opens the database for `workload` (a file import: [`Workload::BulkLoad`]).
    pub fn open_for(&self, workload: Workload) -> anyhow::Result<(ServerConfig, Arc<dyn Store>)> {
        let mut cfg = self.load()?;
        cfg.workload = workload;
        let store = tsunagi_server::open_store(&cfg)
            .map_err(|e| anyhow::anyhow!("opening the database: {e}"))?;
        Ok((cfg, store))
    }
}

impl ServeArgs {
    pub fn load(&self) -> anyhow::Result<ServerConfig> {
        let mut cfg = self.data.load()?;
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        if let Some(b) = &self.base_url {
            cfg.base_url = Some(b.clone());
        }
        if let Some(m) = self.max_body_bytes {
            cfg.max_body_bytes = m;
        }
        Ok(cfg)
    }
}
