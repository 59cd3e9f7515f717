//! Shared state of a running server, and the plug-in point for service modules.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tsunagi_policy::{ReplayCache, ServerKeys};

use crate::config::ServerConfig;
use crate::engine::Engine;

/// An operation a service adds, for the CapabilityStatement.
#[derive(Debug, Clone)]
pub struct OperationDecl {
    /// Without the `$`.
    pub name: &'static str,
    /// Resource type it is invoked on; None for system level.
    pub resource_type: Option<&'static str>,
    pub documentation: &'static str,
}

/// A service of the platform (eligibility, sharing, e-prescription, ...). Services
/// add routes and go through the shared [`Engine`] for every access to data.
pub trait ServiceModule: Send + Sync {
    fn name(&self) -> &'static str;
    fn routes(&self) -> Router<AppState>;
    fn operations(&self) -> Vec<OperationDecl> {
        Vec::new()
    }
    /// Policy rules the service adds (consent, emergency, ...). They join the one
    /// policy module; a service never decides access on its own.
    fn access_rules(&self) -> Vec<Arc<dyn tsunagi_policy::AccessRule>> {
        Vec::new()
    }
}

pub struct Inner {
    pub engine: Engine,
    pub keys: Arc<ServerKeys>,
    pub replay: ReplayCache,
    pub config: ServerConfig,
    pub services: Vec<Arc<dyn ServiceModule>>,
    pub metrics: Option<PrometheusHandle>,
    /// False while draining on shutdown; `/readyz` reports it.
    pub ready: AtomicBool,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
