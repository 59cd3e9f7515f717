//! tsunagi-eprescription: the electronic prescription management service
//! (電子処方箋管理サービス).
//!
//! - [`model`]: the prescription record (state, exchange number, refill and split
//!   cycles) and the per-patient active-medication index;
//! - [`checks`]: duplicate, same-efficacy and contraindication checks;
//! - [`flow`]: the HTTP operations (prescribe, check, cancel, retrieve, accept,
//!   return, provisional check, dispense, paper dispensing, statistics, the
//!   patient's own view);
//! - [`keys`]: practitioner signature keys (HPKI modelled as registered Ed25519 keys);
//! - [`stats`]: counters of checks and alerts for the operator's statistics.
//!
//! Access: prescriptions and dispensing results are written through the engine
//! (policy + audit); the state record and the medication index are the
//! service's own records. What an alert reveals about another institution's
//! medication is decided by the one policy (the consent rule of the eligibility
//! service answers from live reception grants).

use std::path::Path;
use std::sync::Arc;

use axum::{Extension, Router};
use tsunagi_fhir::FhirResult;
use tsunagi_server::{AppState, OperationDecl, ServiceModule};
use tsunagi_store::Store;
use tsunagi_terminology::Terminology;

pub use tsunagi_server::clock::{Clock, ManualClock, SystemClock};

pub mod checks;
pub mod demo;
pub mod flow;
pub mod keys;
pub mod model;
pub mod stats;

/// Service settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Refuse prescriptions and dispensing results without a practitioner signature.
    pub signature_required: bool,
    pub checks: checks::CheckConfig,
}

/// State shared by the handlers.
pub struct Shared {
    /// Drug master (receipt code → YJ) and the interactions table.
    pub terms: Arc<Terminology>,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub stats: stats::Counters,
}

impl Shared {
    /// Today in Japan.
    pub fn today(&self) -> chrono::NaiveDate {
        (self.clock.now() + chrono::Duration::hours(9)).date_naive()
    }
}

/// The service module.
#[derive(Clone)]
pub struct EprescriptionService {
    pub shared: Arc<Shared>,
}

impl EprescriptionService {
    /// A service over the given masters (tests, benchmarks).
    pub fn new(terms: Terminology, config: Config, clock: Arc<dyn Clock>) -> Self {
        EprescriptionService {
            shared: Arc::new(Shared {
                terms: Arc::new(terms),
                clock,
                config,
                stats: stats::Counters::default(),
            }),
        }
    }

    /// Opens the service: the masters imported under `DATA_DIR/terminology/`
    /// (drug master and interactions table; a missing one means no check of
    /// that kind) and the persisted statistics.
    pub fn open(store: Arc<dyn Store>, data_dir: &Path, config: Config) -> FhirResult<Self> {
        Self::open_with_clock(store, data_dir, config, Arc::new(SystemClock))
    }

    pub fn open_with_clock(
        store: Arc<dyn Store>,
        data_dir: &Path,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> FhirResult<Self> {
        let terms = Terminology::open(data_dir)
            .map_err(|e| tsunagi_fhir::FhirError::internal(format!("loading the masters: {e}")))?;
        let svc = Self::new(terms, config, clock);
        svc.shared.stats.load(&*store)?;
        Ok(svc)
    }
}

impl ServiceModule for EprescriptionService {
    fn name(&self) -> &'static str {
        "eprescription"
    }

    fn routes(&self) -> Router<AppState> {
        flow::routes().layer(Extension(self.shared.clone()))
    }

    fn operations(&self) -> Vec<OperationDecl> {
        flow::operations()
    }
}
