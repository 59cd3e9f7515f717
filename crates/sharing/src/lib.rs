//! tsunagi-sharing: the EHR information sharing service (電子カルテ情報共有サービス).
//!
//! Institutions register the five kinds of clinical information (diagnoses, drug
//! and other allergies, infections, lab results) as JP-CLINS Bundles and three
//! documents (referral letter, discharge summary, checkup report); prescriptions,
//! the sixth kind, are extracted from referral letters. Other institutions read
//! them under the patient's consent categories, insurers read checkup reports,
//! patients read their own; retention rules delete them physically on time.
//!
//! - [`kinds`]: what a resource is (information kind, consent category) and the
//!   labels the service stores with it.
//! - [`register`]: `$register-clins`, `$register-document`, `$withdraw`.
//! - [`commit`]: group commit of concurrent registrations (one fsync per group).
//! - [`access`]: the `sharing` access rule (addressee, insurer, mailbox labels).
//! - [`documents`]: `$referrals` and `$retrieve` (marks a referral received).
//! - [`summary`]: the patient summary (`Patient/{id}/$summary`).
//! - [`retention`]: the retention rules, `tsunagi retention run` and the scheduled job.
//! - [`notify`]: infectious-disease notifications (発生届) to a public health centre.
//! - [`signature`]: verification of signed documents (Ed25519 over canonical JSON).
//!
//! Access is never decided here: every read goes through the engine and the one
//! policy (consent categories are security labels the store filters in SQL).

use std::sync::Arc;

use axum::{Extension, Router};
use chrono::{DateTime, Utc};
use tsunagi_policy::AccessRule;
use tsunagi_server::{AppState, OperationDecl, ServiceModule};

pub use tsunagi_server::clock::{Clock, ManualClock, SystemClock};

pub mod access;
pub mod cli;
pub mod commit;
pub mod demo;
pub mod documents;
pub mod kinds;
pub mod notify;
pub mod register;
pub mod retention;
pub mod signature;
pub mod summary;

/// Organisation recorded as the author of what the service itself writes
/// (receipt marks, acknowledgements, purges).
pub const SERVICE_ORG: &str = "sharing-service";

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Retention rules (periods).
    pub retention: retention::Rules,
    /// How often `serve` runs the retention job (seconds; 0 disables it).
    pub retention_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            retention: retention::Rules::default(),
            retention_interval_secs: 6 * 3600,
        }
    }
}

/// State shared by the handlers and the rule.
pub struct Shared {
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    /// The group-commit writer of registrations, started on first use (on the
    /// runtime that serves the requests).
    committer: std::sync::OnceLock<commit::Committer>,
}

impl Shared {
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Self {
        Shared {
            clock,
            config,
            committer: std::sync::OnceLock::new(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The registration writer (must be called inside a tokio runtime).
    pub fn committer(&self) -> &commit::Committer {
        self.committer.get_or_init(commit::Committer::spawn)
    }
}

/// The service module.
#[derive(Clone)]
pub struct SharingService {
    pub shared: Arc<Shared>,
}

impl SharingService {
    pub fn new(config: Config) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Self {
        SharingService {
            shared: Arc::new(Shared::new(config, clock)),
        }
    }

    /// Starts the scheduled retention job on the current runtime (every
    /// `retention_interval_secs`; the first run after one interval).
    pub fn spawn_retention(
        &self,
        store: Arc<dyn tsunagi_store::Store>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.shared.config.retention_interval_secs;
        if every == 0 {
            return None;
        }
        let shared = self.shared.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(every));
            tick.tick().await;
            loop {
                tick.tick().await;
                let (store, shared) = (store.clone(), shared.clone());
                let r = tokio::task::spawn_blocking(move || {
                    retention::run(&*store, &shared.config.retention, shared.now())
                })
                .await;
                match r {
                    Ok(Ok(report)) => tracing::info!(
                        purged = report.purged,
                        examined = report.examined,
                        "retention run"
                    ),
                    Ok(Err(e)) => tracing::error!(error = %e, "retention run failed"),
                    Err(e) => tracing::error!(error = %e, "retention task failed"),
                }
            }
        }))
    }
}

impl ServiceModule for SharingService {
    fn name(&self) -> &'static str {
        "sharing"
    }

    fn routes(&self) -> Router<AppState> {
        Router::new()
            .merge(register::routes())
            .merge(documents::routes())
            .merge(summary::routes())
            .merge(notify::routes())
            .layer(Extension(self.shared.clone()))
    }

    fn operations(&self) -> Vec<OperationDecl> {
        let mut ops = register::operations();
        ops.extend(documents::operations());
        ops.extend(summary::operations());
        ops.extend(notify::operations());
        ops
    }

    fn access_rules(&self) -> Vec<Arc<dyn AccessRule>> {
        vec![Arc::new(access::SharingRule)]
    }
}
