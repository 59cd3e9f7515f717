//! The service's records and the state machine of a prescription.
//!
//! A prescription's state lives in a `Basic` resource written by the service
//! (author organisation [`SERVICE_ORG`]), in the patient's compartment, so no
//! user organisation can change it through REST and the patient sees it. The
//! MedicationRequests stay the prescriber's own records; dispensing results are
//! the pharmacy's own MedicationDispenses.
//!
//! The record's body is one extension holding the JSON of [`Prescription`]
//! (service-internal state, not an exchange format).

use chrono::{Duration, NaiveDate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::{FhirError, FhirResult};

/// Author organisation of the records the service keeps.
pub const SERVICE_ORG: &str = "eprescription-service";
/// Code system of the service's record kinds and alert kinds.
pub const CODE_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/eprescription";
/// Extension carrying a record's state as JSON.
pub const EXT_RECORD: &str = "https://tsunagi.dev/fhir/StructureDefinition/eprescription-record";
/// `MedicationRequest.groupIdentifier.system`: the prescription id.
pub const PRESCRIPTION_ID_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/prescription-id";

/// Largest number of uses of a refill prescription (リフィル処方箋: up to 3 uses).
pub const MAX_USES: u32 = 3;

/// State of a prescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Registered and open for a pharmacy (also between refill cycles).
    Registered,
    /// Locked to one pharmacy (受付).
    Accepted,
    /// Every use dispensed.
    Dispensed,
    /// Returned by the pharmacy (unlocked) before dispensing.
    Returned,
    /// Cancelled by the prescriber before a pharmacy accepted it.
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Registered => "registered",
            State::Accepted => "accepted",
            State::Dispensed => "dispensed",
            State::Returned => "returned",
            State::Cancelled => "cancelled",
        }
    }
}

/// One medication line, as used by the checks and the per-patient index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Med {
    /// YJ code or 一般名コード used for the checks; empty when the line has none
    /// (free text, or codes no loaded master maps: reported as not checked).
    pub code: String,
    pub display: String,
    /// First day of use (JST).
    pub start: NaiveDate,
    /// Days of supply (for a refill prescription: per use × uses).
    pub days: u32,
    /// Institution that prescribed or dispensed it.
    pub org: String,
    /// `MedicationRequest/id` or `MedicationDispense/id`.
    pub source: String,
    /// Prescription id it belongs to (None for a paper-prescription dispensing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx: Option<String>,
}

impl Med {
    /// Last day of use, exclusive.
    pub fn end(&self) -> NaiveDate {
        self.start + Duration::days(i64::from(self.days.max(1)))
    }
    pub fn active_on(&self, day: NaiveDate) -> bool {
        self.start <= day && day < self.end()
    }
    pub fn resource_type(&self) -> &str {
        self.source.split('/').next().unwrap_or("")
    }
}

/// The state of one prescription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prescription {
    pub id: String,
    /// 引換番号: exchange number printed on the patient's copy.
    pub exchange_number: String,
    pub patient: String,
    pub prescriber_org: String,
    #[serde(default)]
    pub prescriber_user: Option<String>,
    pub issued: NaiveDate,
    pub state: State,
    /// The pharmacy holding it while accepted.
    #[serde(default)]
    pub pharmacy: Option<String>,
    /// Dispensing cycles allowed (1; 2 or 3 for a refill prescription).
    pub uses: u32,
    /// Current cycle, 1-based.
    pub cycle: u32,
    /// Dispensings registered in the current cycle (分割調剤: split dispensing).
    pub parts: u32,
    pub requests: Vec<String>,
    #[serde(default)]
    pub dispenses: Vec<String>,
    pub lines: Vec<Med>,
    #[serde(default)]
    pub signed: bool,
}

/// An illegal transition: answered 409.
pub fn illegal(rx: &Prescription, action: &str) -> FhirError {
    FhirError::conflict(format!(
        "prescription {} is {}{}; it cannot be {action}",
        rx.id,
        rx.state.as_str(),
        rx.pharmacy
            .as_deref()
            .map(|p| format!(" (pharmacy {p})"))
            .unwrap_or_default()
    ))
}

impl Prescription {
    /// registered | returned → accepted by `pharmacy`.
    pub fn accept(&mut self, pharmacy: &str) -> FhirResult<()> {
        match self.state {
            State::Registered | State::Returned => {
                self.state = State::Accepted;
                self.pharmacy = Some(pharmacy.to_string());
                Ok(())
            }
            _ => Err(illegal(self, "accepted")),
        }
    }

    /// accepted (by this pharmacy, nothing dispensed in the cycle) → returned.
    pub fn give_back(&mut self, pharmacy: &str) -> FhirResult<()> {
        if self.state == State::Accepted && self.pharmacy.as_deref() == Some(pharmacy) {
            if self.parts > 0 {
                return Err(FhirError::conflict(format!(
                    "prescription {} has {} split dispensing(s) in cycle {}; it cannot be returned",
                    self.id, self.parts, self.cycle
                )));
            }
            self.state = State::Returned;
            self.pharmacy = None;
            Ok(())
        } else {
            Err(illegal(self, &format!("returned by pharmacy {pharmacy}")))
        }
    }

    /// registered | returned → cancelled (by the prescribing institution).
    pub fn cancel(&mut self) -> FhirResult<()> {
        match self.state {
            State::Registered | State::Returned => {
                self.state = State::Cancelled;
                self.pharmacy = None;
                Ok(())
            }
            _ => Err(illegal(self, "cancelled")),
        }
    }

    /// Records a dispensing by the accepting pharmacy. `last_part` ends the cycle
    /// (otherwise it is one part of a split dispensing). A finished cycle opens
    /// the next refill use (state registered, any pharmacy) or, after the last
    /// use, ends the prescription (dispensed).
    pub fn dispense(&mut self, pharmacy: &str, last_part: bool, ids: &[String]) -> FhirResult<()> {
        if self.state != State::Accepted || self.pharmacy.as_deref() != Some(pharmacy) {
            return Err(illegal(self, &format!("dispensed by pharmacy {pharmacy}")));
        }
        self.dispenses.extend(ids.iter().cloned());
        if !last_part {
            self.parts += 1;
            return Ok(());
        }
        self.parts = 0;
        self.pharmacy = None;
        if self.cycle < self.uses {
            self.cycle += 1;
            self.state = State::Registered;
        } else {
            self.state = State::Dispensed;
        }
        Ok(())
    }
}

/// Hex SHA-256 prefix used to derive resource ids from secrets and long ids.
pub fn hash_id(prefix: &str, s: &str) -> String {
    let h = Sha256::digest(s.as_bytes());
    let hex: String = h.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// Id of the prescription record with this exchange number: derived by hashing,
/// so the id (known to the prescriber and the patient) does not reveal the number.
pub fn prescription_id(exchange_number: &str) -> String {
    hash_id("erx-", exchange_number)
}

/// Id of a patient's active-medication index.
pub fn index_id(patient: &str) -> String {
    hash_id("erxmeds-", patient)
}

/// A new random 16-digit exchange number.
pub fn new_exchange_number() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..16)
        .map(|_| char::from(b'0' + r.gen_range(0..10u8)))
        .collect()
}

/// Wraps service state into a Basic resource.
pub fn to_basic(id: &str, kind: &str, patient: Option<&str>, state: &impl Serialize) -> Value {
    let mut b = json!({
        "resourceType": "Basic",
        "id": id,
        "code": {"coding": [{"system": CODE_SYSTEM, "code": kind}]},
        "extension": [{
            "url": EXT_RECORD,
            "valueString": serde_json::to_string(state).unwrap_or_default(),
        }],
    });
    if let Some(p) = patient {
        b["subject"] = json!({"reference": format!("Patient/{p}")});
    }
    b
}

/// Reads service state back from a Basic resource.
pub fn from_basic<T: for<'de> Deserialize<'de>>(r: &Value) -> FhirResult<T> {
    let s = r
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|e| e.get("url").and_then(Value::as_str) == Some(EXT_RECORD))
        })
        .and_then(|e| e.get("valueString"))
        .and_then(Value::as_str)
        .ok_or_else(|| FhirError::internal("service record without its state extension"))?;
    serde_json::from_str(s)
        .map_err(|e| FhirError::internal(format!("unreadable service record: {e}")))
}

/// The active-medication index of one patient: every medication line from
/// prescriptions and dispensing results of all institutions, pruned of lines
/// that ended before the look-back window. Kept in one `Basic` per patient and
/// updated in the same transaction as the prescription or dispensing result, so
/// a check is one primary-key read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MedIndex {
    pub patient: String,
    pub meds: Vec<Med>,
}

impl MedIndex {
    /// Drops lines that ended before `keep_from`.
    pub fn prune(&mut self, keep_from: NaiveDate) {
        self.meds.retain(|m| m.end() > keep_from);
    }
    /// Drops the prescription lines of `rx` (cancelled); what was already
    /// dispensed under it (earlier refill cycles, split parts) stays.
    pub fn remove_rx(&mut self, rx: &str) {
        self.meds
            .retain(|m| m.rx.as_deref() != Some(rx) || m.resource_type() == "MedicationDispense");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(uses: u32) -> Prescription {
        Prescription {
            id: "erx-1".into(),
            exchange_number: "1".into(),
            patient: "p".into(),
            prescriber_org: "h".into(),
            prescriber_user: None,
            issued: NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
            state: State::Registered,
            pharmacy: None,
            uses,
            cycle: 1,
            parts: 0,
            requests: vec![],
            dispenses: vec![],
            lines: vec![],
            signed: false,
        }
    }

    #[test]
    fn transitions() {
        let mut r = rx(1);
        r.accept("ph1").unwrap();
        assert_eq!(r.accept("ph2").unwrap_err().status, 409);
        assert_eq!(r.cancel().unwrap_err().status, 409);
        assert_eq!(r.give_back("ph2").unwrap_err().status, 409);
        r.give_back("ph1").unwrap();
        assert_eq!(r.state, State::Returned);
        r.accept("ph2").unwrap();
        assert_eq!(r.dispense("ph1", true, &[]).unwrap_err().status, 409);
        r.dispense("ph2", true, &["d1".into()]).unwrap();
        assert_eq!(r.state, State::Dispensed);
        assert_eq!(r.accept("ph1").unwrap_err().status, 409);
        let mut c = rx(1);
        c.cancel().unwrap();
        assert_eq!(c.accept("ph1").unwrap_err().status, 409);
    }

    #[test]
    fn refill_and_split() {
        let mut r = rx(3);
        for cycle in 1..=3 {
            assert_eq!(r.cycle, cycle);
            r.accept("ph").unwrap();
            r.dispense("ph", false, &["part".into()]).unwrap();
            assert_eq!(r.state, State::Accepted);
            assert_eq!(r.give_back("ph").unwrap_err().status, 409);
            r.dispense("ph", true, &["last".into()]).unwrap();
        }
        assert_eq!(r.state, State::Dispensed);
        assert_eq!(r.dispenses.len(), 6);
    }

    #[test]
    fn cancelling_keeps_what_was_dispensed() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
        let line = |source: &str, rx: Option<&str>| Med {
            code: "2325003F1020".into(),
            display: String::new(),
            start: day,
            days: 28,
            org: "h".into(),
            source: source.into(),
            rx: rx.map(str::to_string),
        };
        let mut idx = MedIndex {
            patient: "p".into(),
            meds: vec![
                line("MedicationRequest/a-1", Some("a")),
                line("MedicationDispense/d1", Some("a")),
                line("MedicationRequest/b-1", Some("b")),
            ],
        };
        idx.remove_rx("a");
        let left: Vec<&str> = idx.meds.iter().map(|m| m.source.as_str()).collect();
        assert_eq!(left, ["MedicationDispense/d1", "MedicationRequest/b-1"]);
        idx.prune(day + Duration::days(28));
        assert!(idx.meds.is_empty());
    }

    #[test]
    fn ids_hide_the_exchange_number() {
        let id = prescription_id("1234567890123456");
        assert!(!id.contains("1234567890123456"));
        assert_eq!(id, prescription_id("1234567890123456"));
        assert!(id.len() <= 64);
        assert_eq!(new_exchange_number().len(), 16);
    }
}
