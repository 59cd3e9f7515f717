//! tsunagi-server: the platform's HTTP host.
//!
//! - [`engine`]: FHIR interactions with policy decisions and audit (no HTTP);
//!   service modules use it for every access to data.
//! - [`bundle`]: transaction and batch Bundles.
//! - [`http`]: the axum router: `/fhir`, `/auth/token`, `/audit/events`, health and metrics.
//! - [`state`]: shared state and the [`ServiceModule`] plug-in trait.
//! - [`orgs`]: the organisation registry (Organization resources).
//! - [`capability`]: the CapabilityStatement, generated from what is implemented.
//! - [`clock`]: injectable time for services and their tests.

pub mod bundle;
pub mod capability;
pub mod clock;
pub mod config;
pub mod engine;
pub mod http;
pub mod latency;
pub mod orgs;
pub mod state;
pub mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::audit::AuditSink;
use tsunagi_policy::{Policy, ReplayCache, ServerKeys};
use tsunagi_store::Store;

pub use config::ServerConfig;
pub use engine::{Ctx, Engine};
pub use state::{AppState, OperationDecl, ServiceModule};
pub use validate::{BasicValidator, Validate};

/// Opens the configured database: PostgreSQL when `database` is set, otherwise the
/// embedded SQLite file `DATA_DIR/tsunagi.db`. Migrations run here.
pub fn open_store(config: &ServerConfig) -> FhirResult<Arc<dyn Store>> {
    match &config.database {
        Some(url) => Ok(Arc::new(tsunagi_store::postgres::PgStore::connect_for(
            url,
            config.pg_pool_size,
            config.workload,
        )?)),
        None => {
            std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                FhirError::internal(format!(
                    "cannot create data directory {}: {e}",
                    config.data_dir.display()
                ))
            })?;
            Ok(Arc::new(tsunagi_store::sqlite::SqliteStore::open_for(
                &config.data_dir.join("tsunagi.db"),
                config.workload,
            )?))
        }
    }
}

/// Installs the Prometheus recorder once per process; later calls reuse it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// Everything a server needs, assembled.
pub struct Builder {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    pub policy: Policy,
    pub validator: Arc<dyn Validate>,
    pub services: Vec<Arc<dyn ServiceModule>>,
}

impl Builder {
    pub fn new(config: ServerConfig, store: Arc<dyn Store>) -> Self {
        Builder {
            config,
            store,
            policy: Policy::new(),
            validator: Arc::new(BasicValidator),
            services: Vec::new(),
        }
    }

    pub fn validator(mut self, v: Arc<dyn Validate>) -> Self {
        self.validator = v;
        self
    }

    pub fn service(mut self, s: Arc<dyn ServiceModule>) -> Self {
        self.services.push(s);
        self
    }

    /// Builds the state. Must run inside a tokio runtime (the audit sink is a task).
    pub fn build(self) -> FhirResult<AppState> {
        let keys = ServerKeys::load_or_create(&self.config.data_dir)?;
        let mut policy = self.policy;
        for service in &self.services {
            for rule in service.access_rules() {
                policy = policy.with_rule(rule);
            }
        }
        let engine = Engine {
            audit: AuditSink::spawn(self.store.clone()),
            store: self.store,
            policy: Arc::new(policy),
            validator: self.validator,
            base_url: self.config.base_url(),
        };
        Ok(AppState(Arc::new(state::Inner {
            engine,
            keys: Arc::new(keys),
            replay: ReplayCache::new(100_000),
            config: self.config,
            services: self.services,
            metrics: metrics_handle(),
            ready: AtomicBool::new(true),
        })))
    }
}

/// Serves until `shutdown` resolves, then stops accepting, reports not-ready and
/// drains in-flight requests for up to the configured grace period.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    let app = http::router(state.clone());
    let st = state.clone();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        st.ready.store(false, Ordering::Relaxed);
        tracing::info!("shutdown requested; draining in-flight requests");
        let _ = drained_tx.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    tokio::select! {
        r = server => r,
        _ = async { let _ = drained_rx.await; tokio::time::sleep(grace).await; } => {
            tracing::warn!("grace period over; closing remaining connections");
            Ok(())
        }
    }
}
