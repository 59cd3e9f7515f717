//! tsunagi-pmh: the Public Medical Hub (PMH, 自治体と医療機関・薬局をつなぐ情報連携基盤),
//! which lets the My Number card stand in for paper recipient certificates (受給者証),
//! vaccination vouchers and checkup vouchers.
//!
//! - [`catalogue`]: the programme catalogue (法別番号, statutory and municipal
//!   programmes, copayment rules) as data, imported and edited without code changes.
//! - [`recipients`]: municipalities register recipients (受給者) by API and by
//!   full/incremental files; person matching with a review list; recipients are
//!   FHIR `Coverage` of the public-expense type, so `$reception` and `$eligibility`
//!   return them with the insurance.
//! - [`ceiling`]: ceiling management (上限額管理): append-only copayment reports,
//!   summed at query time, corrections, remaining amount at reception.
//! - [`vaccination`]: vouchers, the pre-vaccination questionnaire, vaccination records.
//! - [`checkups`]: maternal/child health and municipal checkup results reported to
//!   the municipality.
//! - [`certificates`]: certificates (診断書等) to a municipality's mailbox.
//! - [`access`]: the municipality-staff, patient self-service and reception rules
//!   PMH adds to the one policy.
//! - [`stats`]: aggregated statistics of use for a municipality (no clinical data).
//! - [`checks`]: counts of eligibility answers that showed each municipality's subsidies.

use std::path::Path;
use std::sync::Arc;

use axum::{Extension, Router};
use chrono::{DateTime, NaiveDate, Utc};
use tsunagi_eligibility::{Clock, SystemClock};
use tsunagi_fhir::FhirResult;
use tsunagi_policy::AccessRule;
use tsunagi_server::{AppState, OperationDecl, ServiceModule};
use tsunagi_store::Store;

pub mod access;
pub mod catalogue;
pub mod ceiling;
pub mod certificates;
pub mod checks;
pub mod checkups;
pub mod cli;
pub mod demo;
pub mod guardians;
pub mod http;
pub mod matching;
pub mod recipients;
pub mod stats;
pub mod vaccination;

/// Author organisation of the records the service keeps itself (catalogue,
/// certificate mailbox entries). No user organisation may modify them through REST.
pub const PMH_ORG: &str = "pmh-service";
/// Code system of the kinds of `Basic` records PMH keeps.
pub const PMH_KIND_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/pmh-record-kind";
/// Extensions PMH defines.
pub const EXT_BASE: &str = "https://tsunagi.dev/fhir/StructureDefinition/pmh-";

/// State shared by the handlers and the access rules.
pub struct Shared {
    pub catalogue: catalogue::Catalogue,
    pub certificates: certificates::Mailbox,
    /// The eligibility service: live reception grants ("the card is the voucher").
    pub eligibility: Option<Arc<tsunagi_eligibility::Shared>>,
    /// Eligibility checks that showed each municipality's subsidies.
    pub checks: Arc<checks::CheckCounters>,
    pub clock: Arc<dyn Clock>,
}

impl Shared {
    /// The state an operator tool's writes need for the access rule: no
    /// eligibility service, an empty catalogue, the system clock, counters
    /// that are not loaded.
    pub fn offline(store: Arc<dyn Store>) -> Shared {
        Shared {
            catalogue: catalogue::Catalogue::default(),
            certificates: certificates::Mailbox::default(),
            eligibility: None,
            checks: Arc::new(checks::CheckCounters::empty(store)),
            clock: Arc::new(SystemClock),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
    /// Today in Japan.
    pub fn today(&self) -> NaiveDate {
        tsunagi_eligibility::cards::jst_date(self.now())
    }
}

/// The PMH service module.
#[derive(Clone)]
pub struct PmhService {
    pub shared: Arc<Shared>,
}

impl PmhService {
    /// Opens over the store: loads the catalogue (adding the statutory programmes
    /// shipped with the crate that the store lacks) and the certificate mailbox.
    pub fn open(
        store: Arc<dyn Store>,
        eligibility: Option<Arc<tsunagi_eligibility::Shared>>,
    ) -> FhirResult<Self> {
        let clock = eligibility
            .as_ref()
            .map(|e| e.clock.clone())
            .unwrap_or_else(|| Arc::new(SystemClock));
        Self::open_with_clock(store, eligibility, clock)
    }

    pub fn open_with_clock(
        store: Arc<dyn Store>,
        eligibility: Option<Arc<tsunagi_eligibility::Shared>>,
        clock: Arc<dyn Clock>,
    ) -> FhirResult<Self> {
        let checks = Arc::new(checks::CheckCounters::load(store.clone())?);
        if let Some(e) = &eligibility {
            e.observe_subsidies(Arc::new(checks::Observer(checks.clone())));
        }
        let shared = Arc::new(Shared {
            catalogue: catalogue::Catalogue::default(),
            certificates: certificates::Mailbox::default(),
            eligibility,
            checks,
            clock,
        });
        shared.catalogue.load(&*store)?;
        let missing = shared.catalogue.missing_builtin();
        if !missing.is_empty() {
            catalogue::save(&*store, &missing, None)?;
            shared.catalogue.replace(missing);
        }
        shared.certificates.load(&*store)?;
        Ok(PmhService { shared })
    }

    /// Data directory is unused for now; kept for symmetry with the eligibility service.
    pub fn open_in(
        store: Arc<dyn Store>,
        _data_dir: &Path,
        eligibility: Option<Arc<tsunagi_eligibility::Shared>>,
    ) -> FhirResult<Self> {
        Self::open(store, eligibility)
    }
}

impl ServiceModule for PmhService {
    fn name(&self) -> &'static str {
        "pmh"
    }

    fn routes(&self) -> Router<AppState> {
        Router::new()
            .merge(catalogue::routes())
            .merge(recipients::routes())
            .merge(ceiling::routes())
            .merge(vaccination::routes())
            .merge(certificates::routes())
            .merge(checkups::routes())
            .merge(guardians::routes())
            .merge(stats::routes())
            .layer(Extension(self.shared.clone()))
    }

    fn operations(&self) -> Vec<OperationDecl> {
        vec![]
    }

    fn access_rules(&self) -> Vec<Arc<dyn AccessRule>> {
        vec![Arc::new(access::PmhRule(self.shared.clone()))]
    }
}
