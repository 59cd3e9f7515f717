//! The documented schema of the research extracts: which primary resources become
//! which Parquet table, and what every column means. The catalogue is generated
//! from these tables; docs/RESEARCH-SCHEMA is this file.
//!
//! Only safe fields are copied. Never copied: resource ids, names, kana, addresses,
//! telecom, identifiers (insurance, recipient, card numbers), free text (`text`,
//! `note`, `valueString`), references other than the subject (which becomes the
//! pseudonym `pid`), and the writing organisation.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// UTF-8 string.
    Text,
    /// Calendar date (Parquet DATE, days since 1970-01-01), Japan date as recorded.
    Date,
    /// 64-bit float.
    Number,
    Boolean,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ColumnDef {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub meaning: &'static str,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct TableDef {
    pub name: &'static str,
    #[serde(rename = "resourceType")]
    pub resource_type: &'static str,
    pub meaning: &'static str,
    /// The column whose range is the table's coverage period.
    #[serde(rename = "periodColumn")]
    pub period_column: Option<&'static str>,
    pub columns: &'static [ColumnDef],
}

const fn c(name: &'static str, kind: Kind, meaning: &'static str) -> ColumnDef {
    ColumnDef {
        name,
        kind,
        meaning,
    }
}

const PID: ColumnDef = c(
    "pid",
    Kind::Text,
    "pseudonym of the person in this dataset (keyed hash by the linkage service; differs per dataset)",
);
const CODE_SYSTEM: ColumnDef = c("code_system", Kind::Text, "code system URI of `code`");
const CODE: ColumnDef = c("code", Kind::Text, "the code");
const DISPLAY: ColumnDef = c(
    "display",
    Kind::Text,
    "display of the code as recorded (code-system text, not free text)",
);

pub const TABLES: &[TableDef] = &[
    TableDef {
        name: "patient",
        resource_type: "Patient",
        meaning: "one row per person: demographics reduced to safe fields",
        period_column: None,
        columns: &[
            PID,
            c(
                "sex",
                Kind::Text,
                "administrative gender (male, female, other, unknown)",
            ),
            c(
                "birth_date",
                Kind::Date,
                "date of birth (pseudonymised form; anonymised extracts truncate it)",
            ),
            c(
                "deceased",
                Kind::Boolean,
                "whether the person is recorded as deceased",
            ),
        ],
    },
    TableDef {
        name: "condition",
        resource_type: "Condition",
        meaning: "diagnoses (病名)",
        period_column: Some("recorded_date"),
        columns: &[
            PID,
            CODE_SYSTEM,
            CODE,
            DISPLAY,
            c("clinical_status", Kind::Text, "active, resolved, ..."),
            c(
                "verification_status",
                Kind::Text,
                "confirmed, provisional (疑い), ...",
            ),
            c("onset_date", Kind::Date, "onset date"),
            c("recorded_date", Kind::Date, "date recorded"),
        ],
    },
    TableDef {
        name: "observation",
        resource_type: "Observation",
        meaning: "laboratory results and vital signs (検査結果)",
        period_column: Some("effective_date"),
        columns: &[
            PID,
            c("category", Kind::Text, "laboratory, vital-signs, ..."),
            CODE_SYSTEM,
            CODE,
            DISPLAY,
            c("effective_date", Kind::Date, "date of the observation"),
            c(
                "value_num",
                Kind::Number,
                "numeric value (valueQuantity.value)",
            ),
            c("value_unit", Kind::Text, "unit of value_num"),
            c(
                "value_code",
                Kind::Text,
                "coded value (valueCodeableConcept code)",
            ),
            c("interpretation", Kind::Text, "H, L, N, ..."),
        ],
    },
    TableDef {
        name: "allergy_intolerance",
        resource_type: "AllergyIntolerance",
        meaning: "allergies and intolerances",
        period_column: Some("recorded_date"),
        columns: &[
            PID,
            CODE_SYSTEM,
            CODE,
            DISPLAY,
            c(
                "category",
                Kind::Text,
                "food, medication, environment, biologic",
            ),
            c("criticality", Kind::Text, "low, high, unable-to-assess"),
            c("clinical_status", Kind::Text, "active, inactive, resolved"),
            c("recorded_date", Kind::Date, "date recorded"),
        ],
    },
    TableDef {
        name: "medication_request",
        resource_type: "MedicationRequest",
        meaning: "prescriptions (処方)",
        period_column: Some("authored_on"),
        columns: &[
            PID,
            CODE_SYSTEM,
            CODE,
            DISPLAY,
            c("status", Kind::Text, "active, completed, cancelled, ..."),
            c("authored_on", Kind::Date, "date prescribed"),
            c("dose_value", Kind::Number, "dose per administration"),
            c("dose_unit", Kind::Text, "unit of dose_value"),
            c(
                "supply_days",
                Kind::Number,
                "days of supply (dispenseRequest.expectedSupplyDuration)",
            ),
        ],
    },
    TableDef {
        name: "medication_dispense",
        resource_type: "MedicationDispense",
        meaning: "dispensing (調剤)",
        period_column: Some("handed_over"),
        columns: &[
            PID,
            CODE_SYSTEM,
            CODE,
            DISPLAY,
            c("status", Kind::Text, "completed, ..."),
            c("handed_over", Kind::Date, "date handed over"),
            c("quantity_value", Kind::Number, "quantity dispensed"),
            c("quantity_unit", Kind::Text, "unit of quantity_value"),
            c("days_supply", Kind::Number, "days of supply"),
        ],
    },
];

pub fn table(name: &str) -> Option<&'static TableDef> {
    TABLES.iter().find(|t| t.name == name)
}
