//! tsunagi-eligibility: online eligibility verification (オンライン資格確認等システム),
//! the front door of the platform.
//!
//! - [`coverage`]: insurers register coverage (資格情報); one person, a coverage history.
//! - [`bulk`]: bulk coverage files (NDJSON/CSV), resumable, per-row error report.
//! - [`eligibility`]: `$eligibility` by insurance numbers + birth date (資格確認書 path).
//! - [`cards`]: My Number card user-authentication certificates and smartphone
//!   certificates (public parts only), and the card simulator.
//! - [`reception`]: `$reception-nonce` / `$reception` at the face-recognition card reader.
//! - [`consent`]: consent grants and the consent access rule.
//! - [`emergency`], [`disaster`]: 救急時医療情報閲覧 and 災害時モード access rules.
//! - [`facility`]: per-facility settings (hide clinical history).
//! - [`selfservice`]: the patient's own API (eligibility, consents, access history).

use std::sync::Arc;

use axum::{Extension, Router};
use tsunagi_policy::AccessRule;
use tsunagi_server::{AppState, OperationDecl, ServiceModule};

pub mod bulk;
pub mod cards;
pub mod cli;
pub mod consent;
pub mod coverage;
pub mod disaster;
pub mod eligibility;
pub mod emergency;
pub mod facility;
pub mod reception;
pub mod selfservice;

/// State shared by the service's handlers and its access rules.
pub struct Shared {
    pub consent: consent::Grants,
    pub emergency: emergency::Sessions,
    pub disaster: disaster::Declarations,
    pub reception: reception::Nonces,
    pub config: Config,
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Lifetime of an outpatient consent grant (default 24 hours).
    pub outpatient_grant_secs: i64,
    /// Lifetime of a reception nonce (default 5 minutes).
    pub nonce_ttl_secs: i64,
    /// Lifetime of an emergency access session (default 2 hours).
    pub emergency_session_secs: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            outpatient_grant_secs: 24 * 3600,
            nonce_ttl_secs: 300,
            emergency_session_secs: 2 * 3600,
        }
    }
}

/// The service module.
#[derive(Clone)]
pub struct EligibilityService {
    pub shared: Arc<Shared>,
}

impl EligibilityService {
    pub fn new(config: Config) -> Self {
        EligibilityService {
            shared: Arc::new(Shared {
                consent: consent::Grants::default(),
                emergency: emergency::Sessions::default(),
                disaster: disaster::Declarations::default(),
                reception: reception::Nonces::default(),
                config,
            }),
        }
    }
}

impl ServiceModule for EligibilityService {
    fn name(&self) -> &'static str {
        "eligibility"
    }

    fn routes(&self) -> Router<AppState> {
        Router::new()
            .merge(coverage::routes())
            .merge(bulk::routes())
            .merge(eligibility::routes())
            .merge(reception::routes())
            .merge(emergency::routes())
            .merge(disaster::routes())
            .merge(facility::routes())
            .merge(selfservice::routes())
            .layer(Extension(self.shared.clone()))
    }

    fn operations(&self) -> Vec<OperationDecl> {
        let mut ops = Vec::new();
        ops.extend(eligibility::operations());
        ops.extend(reception::operations());
        ops.extend(emergency::operations());
        ops.extend(disaster::operations());
        ops
    }

    fn access_rules(&self) -> Vec<Arc<dyn AccessRule>> {
        vec![
            Arc::new(consent::ConsentRule(self.shared.clone())),
            Arc::new(emergency::EmergencyRule(self.shared.clone())),
            Arc::new(disaster::DisasterRule(self.shared.clone())),
        ]
    }
}
