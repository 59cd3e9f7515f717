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

use std::path::Path;
use std::sync::Arc;

use axum::{Extension, Router};
use chrono::{DateTime, Utc};
use tsunagi_fhir::FhirResult;
use tsunagi_policy::{AccessRule, Role};
use tsunagi_server::{AppState, OperationDecl, ServiceModule};
use tsunagi_store::Store;

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

pub use tsunagi_server::clock::{Clock, ManualClock, SystemClock};

/// State shared by the service's handlers and its access rules.
pub struct Shared {
    pub consent: consent::Grants,
    pub emergency: emergency::Sessions,
    pub disaster: disaster::Declarations,
    pub reception: reception::Nonces,
    /// Nonces of the patient's card login (`/auth/card-nonce`), apart from reception's.
    pub card_login: reception::Nonces,
    pub facility: facility::Settings,
    /// The card authority's key (stands in for J-LIS): verifies card certificates.
    pub cards: cards::CardAuthority,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    /// Told of every eligibility answer that shows subsidies (see [`SubsidyObserver`]).
    observers: std::sync::RwLock<Vec<Arc<dyn SubsidyObserver>>>,
}

/// Told of each eligibility answer at reception (`$reception`, `$eligibility`)
/// that showed one or more subsidies (公費), so the service that registered
/// them can count their use (PMH's municipal statistics) without this service
/// knowing who they are or reading the audit trail back. Called on the request
/// path: an observer only counts, it never blocks or fails the answer.
pub trait SubsidyObserver: Send + Sync {
    /// `subsidies` are the JSON texts of the public-expense Coverage resources
    /// the answer showed (as stored: `$eligibility` sends them on unparsed).
    fn shown(&self, at: DateTime<Utc>, subsidies: &[&str]);
}

impl Shared {
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Registers an observer of the subsidies eligibility answers show.
    pub fn observe_subsidies(&self, observer: Arc<dyn SubsidyObserver>) {
        self.observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    /// Tells the observers that an answer showed `subsidies` (nothing when empty).
    pub(crate) fn subsidies_shown(&self, subsidies: &[&str]) {
        if subsidies.is_empty() {
            return;
        }
        let now = self.now();
        for o in self
            .observers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            o.shown(now, subsidies);
        }
    }
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Lifetime of an outpatient consent grant (default 24 hours).
    pub outpatient_grant_secs: i64,
    /// Longest an inpatient grant lasts when no discharge is recorded (default 180 days).
    pub inpatient_grant_max_secs: i64,
    /// Lifetime of a reception nonce (default 5 minutes).
    pub nonce_ttl_secs: i64,
    /// Lifetime of an emergency access session (default 2 hours).
    pub emergency_session_secs: i64,
    /// Lifetime of a patient token obtained with the card (default 15 minutes).
    pub self_service_token_secs: i64,
    /// Roles that read clinical data under a consent grant (default doctor, dentist, pharmacist).
    pub qualified_roles: Vec<Role>,
    /// Roles that may open an emergency access session (default doctor).
    pub emergency_roles: Vec<Role>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            outpatient_grant_secs: 24 * 3600,
            inpatient_grant_max_secs: 180 * 24 * 3600,
            nonce_ttl_secs: 300,
            emergency_session_secs: 2 * 3600,
            self_service_token_secs: 900,
            qualified_roles: vec![Role::Doctor, Role::Dentist, Role::Pharmacist],
            emergency_roles: vec![Role::Doctor],
        }
    }
}

/// The service module.
#[derive(Clone)]
pub struct EligibilityService {
    pub shared: Arc<Shared>,
}

impl EligibilityService {
    /// Empty in-memory state with a throw-away card authority (unit tests of
    /// handlers that need no persisted grants). Servers use [`EligibilityService::open`].
    pub fn new(config: Config) -> Self {
        Self::in_memory(config, Arc::new(SystemClock))
    }

    /// Empty in-memory state on the given clock (policy-level tests).
    pub fn in_memory(config: Config, clock: Arc<dyn Clock>) -> Self {
        Self::from_parts(cards::CardAuthority::ephemeral(), clock, config)
    }

    fn from_parts(cards: cards::CardAuthority, clock: Arc<dyn Clock>, config: Config) -> Self {
        EligibilityService {
            shared: Arc::new(Shared {
                consent: consent::Grants::default(),
                emergency: emergency::Sessions::default(),
                disaster: disaster::Declarations::default(),
                reception: reception::Nonces::default(),
                card_login: reception::Nonces::default(),
                facility: facility::Settings::default(),
                cards,
                clock,
                config,
                observers: Default::default(),
            }),
        }
    }

    /// Opens the service over the store: loads (or creates) the card authority key
    /// in `DATA_DIR/keys/`, and the live consent grants, disaster declarations and
    /// facility settings from the store.
    pub fn open(store: Arc<dyn Store>, data_dir: &Path, config: Config) -> FhirResult<Self> {
        Self::open_with_clock(store, data_dir, config, Arc::new(SystemClock))
    }

    /// As [`EligibilityService::open`] with an injected clock.
    pub fn open_with_clock(
        store: Arc<dyn Store>,
        data_dir: &Path,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> FhirResult<Self> {
        let ca = cards::CardAuthority::load_or_create(data_dir)?;
        let svc = Self::from_parts(ca, clock, config);
        let now = svc.shared.now();
        svc.shared.consent.load(&*store, now)?;
        svc.shared.disaster.load(&*store)?;
        svc.shared.facility.load(&*store)?;
        Ok(svc)
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
        ops.extend(facility::operations());
        ops.extend(selfservice::operations());
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
