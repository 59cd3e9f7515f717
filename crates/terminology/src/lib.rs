//! tsunagi-terminology: the Japanese terminology masters the platform validates
//! and reasons with.
//!
//! - 医薬品マスター (drug master, SSK basic master "Y"): レセプト電算コード (claims
//!   code, 9 digits), 薬価基準収載医薬品コード / YJ code (12), 一般名コード
//!   (generic-name prescribing code, 12, ending in `ZZZ`).
//! - 傷病名マスター (disease-name master "B"): 傷病名コード (7 digits) → 病名管理番号
//!   (MEDIS key number, 8 digits) → ICD-10 (2013).
//! - 修飾語マスター (modifier master "Z").
//! - JLAC10 lab item set of the EHR sharing service (JP-CLINS 43 lab items and the
//!   infection items), from the IG's CodeSystem JSON or the flat CSV.
//! - J-FAGY allergen codes.
//!
//! [`import`] reads the published files (Shift_JIS or UTF-8 CSV; per-line error
//! report without aborting) and stores each kind as JSON under
//! `DATA_DIR/terminology/`. [`Terminology::open`] loads them into in-memory maps,
//! so every lookup is a hash lookup.

pub mod cli;
mod csv;
mod import;
pub mod yj;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use import::{ImportReport, LineError, import, import_with_progress};

/// Code system URIs for the masters (several aliases are in use in the IGs).
pub mod systems {
    /// レセプト電算処理用医薬品コード (claims drug code).
    pub const DRUG_RECEIPT: &[&str] = &["urn:oid:1.2.392.100495.20.2.74"];
    /// YJ code (個別医薬品コード).
    pub const YJ: &[&str] = &[
        "urn:oid:1.2.392.100495.20.1.73",
        "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code",
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeYJ_CS",
    ];
    /// MEDIS 医薬品HOTコード: HOT9 (product + company: what prescriptions carry),
    /// HOT13 (package level; its first 9 digits are the HOT9) and HOT7 (処方用番号,
    /// the product regardless of company). URIs from JP Core's NamingSystems.
    pub const HOT9: &[&str] = &[
        "urn:oid:1.2.392.200119.4.403.1",
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeHOT9_CS",
    ];
    pub const HOT13: &[&str] = &[
        "urn:oid:1.2.392.200119.4.402.1",
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeHOT13_CS",
    ];
    pub const HOT7: &[&str] = &[
        "urn:oid:1.2.392.200119.4.403.2",
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeHOT7_CS",
    ];
    /// 一般名処方マスタ code.
    pub const GENERAL_NAME: &[&str] = &[
        "urn:oid:1.2.392.100495.20.1.81",
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationGeneralOrderCode",
    ];
    /// 傷病名コード (claims disease code, 7 digits). No canonical URI for it was found
    /// in the loaded IGs, so a Tsunagi-local URI is used until one is confirmed.
    pub const DISEASE_RECEIPT: &[&str] = &["urn:tsunagi:ssk:disease-code"];
    /// 病名交換用コード (MEDIS exchange code, 4 characters, not unique).
    pub const DISEASE_EXCHANGE: &[&str] = &["urn:oid:1.2.392.200119.4.101.6"];
    /// 病名管理番号 (MEDIS standard disease-name key number).
    pub const DISEASE_KEY: &[&str] = &["http://medis.or.jp/CodeSystem/master-disease-keyNumber"];
    /// 修飾語管理番号 (MEDIS modifier key number).
    pub const MODIFIER_KEY: &[&str] =
        &["http://medis.or.jp/CodeSystem/master-disease-modKeyNumber"];
    /// JP-CLINS JLAC10 lab item sets (core 43 items, infection items).
    pub const JLAC10_CORE: &str =
        "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS";
    pub const JLAC10_INFECTION: &str =
        "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_InfectionLabo_CS";
    /// J-FAGY food / non-food allergens.
    pub const JFAGY_FOOD: &str = "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyFoodAllergen_CS";
    pub const JFAGY_NON_FOOD: &str =
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyNonFoodNonMedicationAllergen_CS";
}

/// The kinds of master `tsunagi masters import` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MasterKind {
    Drug,
    Disease,
    Modifier,
    Jlac10,
    Jfagy,
    /// 併用禁忌 table: pairs of YJ codes (matched on the ingredient part) with a reason;
    /// operator-maintained CSV, see [`Interaction`].
    Interactions,
    /// MEDIS 医薬品HOTコードマスター (HOT9 or HOT13 file): maps the HOT codes
    /// prescriptions carry to YJ codes, so HOT-only lines can be checked.
    Hot,
}

impl MasterKind {
    pub fn file_name(self) -> &'static str {
        match self {
            MasterKind::Drug => "drug.json",
            MasterKind::Disease => "disease.json",
            MasterKind::Modifier => "modifier.json",
            MasterKind::Jlac10 => "jlac10.json",
            MasterKind::Jfagy => "jfagy.json",
            MasterKind::Interactions => "interactions.json",
            MasterKind::Hot => "hot.json",
        }
    }
}

/// One row of the drug master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Drug {
    pub receipt_code: String,
    pub name: String,
    pub kana: String,
    pub unit: String,
    /// 薬価 per unit (yen), as published (`16.50`).
    pub price: String,
    /// 薬価基準収載医薬品コード (YJ-like, 12 chars); empty for special codes.
    pub yj_code: String,
    /// 一般名コード (12 chars ending `ZZZ`), empty when none.
    pub general_code: String,
    /// 一般名処方の標準的な記載.
    pub general_name: String,
    pub generic: bool,
    /// 剤形: 1 内用, 4 注射, 6 外用, 8 歯科用, 3 その他.
    pub dosage_form: String,
}

/// One row of the HOT code master, reduced to what the platform uses.
/// Layout of the MEDIS file (24 columns, header line): 1 基準番号（ＨＯＴコード）
/// (9 digits in the HOT9 file, 13 in the HOT13 file), 2 処方用番号（ＨＯＴ７）,
/// 3 会社識別用番号, ..., 7 薬価基準収載医薬品コード, 8 個別医薬品コード (YJ),
/// 9 レセプト電算処理システムコード（１）, 12 販売名, ..., 23 更新区分, 24 更新年月日.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HotCode {
    /// HOT9 (the first 9 digits of the 基準番号).
    pub hot9: String,
    /// 個別医薬品コード (YJ, 12 characters).
    pub yj_code: String,
    /// レセプト電算処理システムコード (9 digits), empty when none.
    pub receipt_code: String,
    /// 販売名.
    pub name: String,
}

/// One row of the disease-name master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Disease {
    pub code: String,
    pub name: String,
    pub short_name: String,
    pub kana: String,
    /// 病名管理番号.
    pub key_number: String,
    pub exchange_code: String,
    pub icd10: String,
    pub icd10_secondary: String,
}

/// One row of the modifier master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Modifier {
    pub code: String,
    pub name: String,
    pub kana: String,
    pub key_number: String,
    pub exchange_code: String,
    /// 修飾語区分 (`A1000000` .. `A8000000`; A8 = suffix).
    pub class: String,
}

/// One JLAC10 code of the sharing service's lab item sets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabCode {
    pub code: String,
    /// `corelabo` or `infectionlabo`.
    pub codeset: String,
    pub group: String,
    pub display: String,
    /// Japanese item name (core items only).
    pub item_name: String,
    pub specimen: String,
    pub method: String,
}

/// One J-FAGY allergen code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Allergen {
    pub code: String,
    pub term: String,
    pub kana: String,
    pub english: String,
    pub level: u8,
    pub major: bool,
    /// 変更区分 3 (deleted).
    pub deleted: bool,
}

/// Result of `$lookup`.
#[derive(Debug, Clone, PartialEq)]
pub struct LookupResult {
    pub system: String,
    pub code: String,
    pub display: String,
    /// Further properties (`icd10`, `keyNumber`, `yjCode`, ...).
    pub properties: Vec<(String, String)>,
}

impl LookupResult {
    /// As a FHIR `Parameters` resource (the `$lookup` response).
    pub fn to_parameters(&self) -> Value {
        let mut p = vec![
            json!({"name": "name", "valueString": self.system}),
            json!({"name": "display", "valueString": self.display}),
        ];
        for (k, v) in &self.properties {
            p.push(json!({"name": "property", "part": [{"name": "code", "valueCode": k}, {"name": "value", "valueString": v}]}));
        }
        json!({"resourceType": "Parameters", "parameter": p})
    }
}

/// Result of `$validate-code`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidateCodeResult {
    pub result: bool,
    pub display: Option<String>,
    pub message: Option<String>,
}

impl ValidateCodeResult {
    pub fn to_parameters(&self) -> Value {
        let mut p = vec![json!({"name": "result", "valueBoolean": self.result})];
        if let Some(d) = &self.display {
            p.push(json!({"name": "display", "valueString": d}));
        }
        if let Some(m) = &self.message {
            p.push(json!({"name": "message", "valueString": m}));
        }
        json!({"resourceType": "Parameters", "parameter": p})
    }
}

/// One contraindicated combination (併用禁忌) of the interactions table.
///
/// File format (`tsunagi masters import --kind interactions FILE`): CSV, UTF-8 or
/// Shift_JIS, one pair per line `code_a,code_b,reason`; an optional header line
/// starting with `code_a`; lines starting with `#` are comments. A code is a
/// 12-character YJ code, a 一般名コード (`...ZZZ`) or a 7-digit ingredient
/// (薬効分類 + 成分); pairs are unordered and matched on the ingredient part, so
/// every brand and generic form of the two ingredients is covered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Interaction {
    pub code_a: String,
    pub code_b: String,
    pub reason: String,
}

/// The ingredient part of a code of the interactions table (YJ, 一般名コード or
/// the 7 digits themselves).
pub fn interaction_ingredient(code: &str) -> Option<&str> {
    if code.len() == 7 && code.bytes().all(|b| b.is_ascii_digit()) {
        Some(code)
    } else {
        yj::ingredient(code)
    }
}

fn interaction_key(a: &str, b: &str) -> Option<(String, String)> {
    let (a, b) = (interaction_ingredient(a)?, interaction_ingredient(b)?);
    Some(if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    })
}

/// The masters, in memory.
#[derive(Default, Debug)]
pub struct Terminology {
    drugs: HashMap<String, Drug>,
    drugs_by_yj: HashMap<String, Vec<String>>,
    general_names: HashMap<String, String>,
    drugs_by_general: HashMap<String, Vec<String>>,
    diseases: HashMap<String, Disease>,
    diseases_by_key: HashMap<String, String>,
    diseases_by_exchange: HashMap<String, Vec<String>>,
    modifiers: HashMap<String, Modifier>,
    modifiers_by_key: HashMap<String, String>,
    lab: HashMap<String, LabCode>,
    allergens: HashMap<String, Allergen>,
    /// Contraindicated pairs keyed by (smaller, larger) ingredient (7 digits).
    interactions: HashMap<(String, String), Interaction>,
    /// HOT9 → row.
    hot: HashMap<String, HotCode>,
    loaded: Vec<MasterKind>,
}

/// Where the masters of a data directory live.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("terminology")
}

impl Terminology {
    /// Loads every imported master under `DATA_DIR/terminology/`; a missing master
    /// is simply not loaded (its systems are then "unknown", never "invalid").
    pub fn open(data_dir: &Path) -> anyhow::Result<Terminology> {
        let dir = store_dir(data_dir);
        let mut t = Terminology::default();
        for kind in [
            MasterKind::Drug,
            MasterKind::Disease,
            MasterKind::Modifier,
            MasterKind::Jlac10,
            MasterKind::Jfagy,
            MasterKind::Interactions,
            MasterKind::Hot,
        ] {
            let p = dir.join(kind.file_name());
            if !p.is_file() {
                continue;
            }
            let bytes = std::fs::read(&p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            match kind {
                MasterKind::Drug => t.set_drugs(serde_json::from_slice(&bytes)?),
                MasterKind::Disease => t.set_diseases(serde_json::from_slice(&bytes)?),
                MasterKind::Modifier => t.set_modifiers(serde_json::from_slice(&bytes)?),
                MasterKind::Jlac10 => t.set_lab(serde_json::from_slice(&bytes)?),
                MasterKind::Jfagy => t.set_allergens(serde_json::from_slice(&bytes)?),
                MasterKind::Interactions => t.set_interactions(serde_json::from_slice(&bytes)?),
                MasterKind::Hot => t.set_hot(serde_json::from_slice(&bytes)?),
            }
        }
        Ok(t)
    }

    /// Masters present.
    pub fn loaded(&self) -> &[MasterKind] {
        &self.loaded
    }

    fn mark(&mut self, k: MasterKind) {
        if !self.loaded.contains(&k) {
            self.loaded.push(k);
        }
    }

    pub fn set_drugs(&mut self, rows: Vec<Drug>) {
        self.drugs.clear();
        self.drugs_by_yj.clear();
        self.general_names.clear();
        self.drugs_by_general.clear();
        for d in rows {
            if !d.yj_code.is_empty() {
                self.drugs_by_yj
                    .entry(d.yj_code.clone())
                    .or_default()
                    .push(d.receipt_code.clone());
            }
            if !d.general_code.is_empty() {
                self.general_names
                    .entry(d.general_code.clone())
                    .or_insert_with(|| d.general_name.clone());
                self.drugs_by_general
                    .entry(d.general_code.clone())
                    .or_default()
                    .push(d.receipt_code.clone());
            }
            self.drugs.insert(d.receipt_code.clone(), d);
        }
        self.mark(MasterKind::Drug);
    }
    pub fn set_diseases(&mut self, rows: Vec<Disease>) {
        self.diseases.clear();
        self.diseases_by_key.clear();
        self.diseases_by_exchange.clear();
        for d in rows {
            if !d.exchange_code.is_empty() {
                self.diseases_by_exchange
                    .entry(d.exchange_code.clone())
                    .or_default()
                    .push(d.code.clone());
            }
            if !d.key_number.is_empty() {
                self.diseases_by_key
                    .insert(d.key_number.clone(), d.code.clone());
            }
            self.diseases.insert(d.code.clone(), d);
        }
        self.mark(MasterKind::Disease);
    }
    pub fn set_modifiers(&mut self, rows: Vec<Modifier>) {
        self.modifiers.clear();
        self.modifiers_by_key.clear();
        for m in rows {
            if !m.key_number.is_empty() {
                self.modifiers_by_key
                    .insert(m.key_number.clone(), m.code.clone());
            }
            self.modifiers.insert(m.code.clone(), m);
        }
        self.mark(MasterKind::Modifier);
    }
    pub fn set_lab(&mut self, rows: Vec<LabCode>) {
        self.lab = rows.into_iter().map(|r| (r.code.clone(), r)).collect();
        self.mark(MasterKind::Jlac10);
    }
    pub fn set_interactions(&mut self, rows: Vec<Interaction>) {
        self.interactions.clear();
        for r in rows {
            if let Some(k) = interaction_key(&r.code_a, &r.code_b) {
                self.interactions.insert(k, r);
            }
        }
        self.mark(MasterKind::Interactions);
    }
    pub fn set_allergens(&mut self, rows: Vec<Allergen>) {
        self.allergens = rows.into_iter().map(|r| (r.code.clone(), r)).collect();
        self.mark(MasterKind::Jfagy);
    }

    // ------------------------------------------------------------ direct lookups

    /// Drug by レセプト電算コード.
    pub fn set_hot(&mut self, rows: Vec<HotCode>) {
        self.hot = rows.into_iter().map(|h| (h.hot9.clone(), h)).collect();
        self.mark(MasterKind::Hot);
    }

    /// The HOT master row of a HOT9 or HOT13 code (HOT13's first 9 digits).
    pub fn hot(&self, code: &str) -> Option<&HotCode> {
        let hot9 = match code.len() {
            9 | 13 if code.bytes().all(|b| b.is_ascii_digit()) => &code[..9],
            _ => return None,
        };
        self.hot.get(hot9)
    }

    /// The YJ code of a HOT7 (処方用番号): the product regardless of company. Its
    /// HOT9 rows may carry different YJ codes (brands and generics sharing one
    /// 処方用番号 are rare but exist); only an answer all of them agree on the
    /// ingredient of is given, so a check never rests on a guess.
    pub fn hot7_yj(&self, hot7: &str) -> Option<&HotCode> {
        if !(hot7.len() == 7 && hot7.bytes().all(|b| b.is_ascii_digit())) {
            return None;
        }
        let mut found: Option<&HotCode> = None;
        for h in self.hot.values().filter(|h| h.hot9.starts_with(hot7)) {
            match found {
                None => found = Some(h),
                Some(f) if yj::ingredient(&f.yj_code) == yj::ingredient(&h.yj_code) => {}
                Some(_) => return None,
            }
        }
        found
    }

    pub fn drug(&self, receipt_code: &str) -> Option<&Drug> {
        self.drugs.get(receipt_code)
    }
    /// Drugs whose 薬価基準収載医薬品コード is `yj`.
    pub fn drugs_by_yj(&self, yj: &str) -> Vec<&Drug> {
        self.drugs_by_yj
            .get(yj)
            .map(|v| v.iter().filter_map(|c| self.drugs.get(c)).collect())
            .unwrap_or_default()
    }
    /// 一般名処方の標準的な記載 for a 一般名コード.
    pub fn general_name(&self, code: &str) -> Option<&str> {
        self.general_names.get(code).map(String::as_str)
    }
    /// Disease by 傷病名コード.
    pub fn disease(&self, code: &str) -> Option<&Disease> {
        self.diseases.get(code)
    }
    /// Disease by 病名管理番号.
    pub fn disease_by_key(&self, key_number: &str) -> Option<&Disease> {
        self.diseases_by_key
            .get(key_number)
            .and_then(|c| self.diseases.get(c))
    }
    /// Diseases sharing a 病名交換用コード.
    pub fn diseases_by_exchange_code(&self, exchange: &str) -> Vec<&Disease> {
        self.diseases_by_exchange
            .get(exchange)
            .map(|v| v.iter().filter_map(|c| self.diseases.get(c)).collect())
            .unwrap_or_default()
    }
    /// 傷病名コード → 病名管理番号.
    pub fn disease_key_number(&self, code: &str) -> Option<&str> {
        self.diseases
            .get(code)
            .map(|d| d.key_number.as_str())
            .filter(|s| !s.is_empty())
    }
    /// 傷病名コード or 病名管理番号 → ICD-10 (2013), without a dot (`I10`, `E119`).
    pub fn icd10(&self, code_or_key: &str) -> Option<&str> {
        self.diseases
            .get(code_or_key)
            .or_else(|| self.disease_by_key(code_or_key))
            .map(|d| d.icd10.as_str())
            .filter(|s| !s.is_empty())
    }
    pub fn modifier(&self, code: &str) -> Option<&Modifier> {
        self.modifiers.get(code)
    }
    pub fn modifier_by_key(&self, key: &str) -> Option<&Modifier> {
        self.modifiers_by_key
            .get(key)
            .and_then(|c| self.modifiers.get(c))
    }
    /// A JLAC10 code of the sharing service's lab item sets.
    pub fn lab_code(&self, code: &str) -> Option<&LabCode> {
        self.lab.get(code)
    }
    pub fn allergen(&self, code: &str) -> Option<&Allergen> {
        self.allergens.get(code)
    }

    /// YJ ingredient part (first 8 characters: 薬効分類 4 + 成分 3 + 剤形 1); see [`yj`].
    pub fn yj_ingredient(code: &str) -> Option<&str> {
        yj::ingredient(code)
    }

    /// The drugs a brand-unspecified code (一般名コード `...ZZZ`) stands for.
    pub fn drugs_for_general_code(&self, code: &str) -> Vec<&Drug> {
        let mut v: Vec<&Drug> = self
            .drugs_by_general
            .get(code)
            .map(|c| c.iter().filter_map(|r| self.drugs.get(r)).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.receipt_code.cmp(&b.receipt_code));
        v
    }

    /// The 併用禁忌 entry for two drug codes (YJ, 一般名コード or 7-digit ingredient),
    /// in either order, matched on the ingredient part.
    pub fn interaction(&self, a: &str, b: &str) -> Option<&Interaction> {
        self.interactions.get(&interaction_key(a, b)?)
    }

    /// Number of contraindicated pairs loaded.
    pub fn interaction_count(&self) -> usize {
        self.interactions.len()
    }

    // ------------------------------------------------------------ FHIR operations

    /// Which master a system URI belongs to, if it is loaded.
    pub fn master_of(&self, system: &str) -> Option<MasterKind> {
        let k = if systems::DRUG_RECEIPT.contains(&system)
            || systems::YJ.contains(&system)
            || systems::GENERAL_NAME.contains(&system)
        {
            MasterKind::Drug
        } else if systems::DISEASE_RECEIPT.contains(&system)
            || systems::DISEASE_KEY.contains(&system)
            || systems::DISEASE_EXCHANGE.contains(&system)
        {
            MasterKind::Disease
        } else if systems::MODIFIER_KEY.contains(&system) {
            MasterKind::Modifier
        } else if system == systems::JLAC10_CORE || system == systems::JLAC10_INFECTION {
            MasterKind::Jlac10
        } else if system == systems::JFAGY_FOOD || system == systems::JFAGY_NON_FOOD {
            MasterKind::Jfagy
        } else if systems::HOT9.contains(&system) || systems::HOT13.contains(&system) {
            MasterKind::Hot
        } else {
            return None;
        };
        self.loaded.contains(&k).then_some(k)
    }

    /// `CodeSystem/$lookup`: `None` when the system is not a loaded master or the
    /// code is not in it.
    pub fn lookup(&self, system: &str, code: &str) -> Option<LookupResult> {
        let kind = self.master_of(system)?;
        let r = |display: &str, props: Vec<(&str, &str)>| LookupResult {
            system: system.to_string(),
            code: code.to_string(),
            display: display.to_string(),
            properties: props
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        match kind {
            MasterKind::Drug if systems::DRUG_RECEIPT.contains(&system) => {
                let d = self.drug(code)?;
                Some(r(
                    &d.name,
                    vec![
                        ("yjCode", &d.yj_code),
                        ("generalCode", &d.general_code),
                        ("unit", &d.unit),
                        ("price", &d.price),
                    ],
                ))
            }
            MasterKind::Drug if systems::GENERAL_NAME.contains(&system) => {
                let n = self.general_name(code)?;
                Some(r(
                    n,
                    vec![("ingredient", yj::ingredient(code).unwrap_or(""))],
                ))
            }
            MasterKind::Drug => {
                let ds = self.drugs_by_yj(code);
                let d = ds.first()?;
                Some(r(
                    &d.name,
                    vec![
                        ("receiptCode", &d.receipt_code),
                        ("generalCode", &d.general_code),
                        ("ingredient", yj::ingredient(code).unwrap_or("")),
                    ],
                ))
            }
            MasterKind::Disease => {
                let d = if systems::DISEASE_KEY.contains(&system) {
                    self.disease_by_key(code)?
                } else if systems::DISEASE_EXCHANGE.contains(&system) {
                    *self.diseases_by_exchange_code(code).first()?
                } else {
                    self.disease(code)?
                };
                Some(r(
                    &d.name,
                    vec![
                        ("diseaseCode", &d.code),
                        ("keyNumber", &d.key_number),
                        ("icd10", &d.icd10),
                        ("icd10Secondary", &d.icd10_secondary),
                        ("kana", &d.kana),
                    ],
                ))
            }
            MasterKind::Modifier => {
                let m = self.modifier_by_key(code).or_else(|| self.modifier(code))?;
                Some(r(
                    &m.name,
                    vec![
                        ("modifierCode", &m.code),
                        ("keyNumber", &m.key_number),
                        ("class", &m.class),
                    ],
                ))
            }
            MasterKind::Jlac10 => {
                let l = self.lab_code(code)?;
                let want = if system == systems::JLAC10_CORE {
                    "corelabo"
                } else {
                    "infectionlabo"
                };
                if l.codeset != want {
                    return None;
                }
                Some(r(
                    &l.display,
                    vec![
                        ("group", &l.group),
                        ("itemName", &l.item_name),
                        ("specimen", &l.specimen),
                        ("method", &l.method),
                    ],
                ))
            }
            MasterKind::Jfagy => {
                let a = self.allergen(code)?;
                let food = system == systems::JFAGY_FOOD;
                if (food && !a.code.starts_with("J9F") && !a.code.starts_with("D9F"))
                    || (!food && !a.code.starts_with("J9N") && !a.code.starts_with("D9N"))
                {
                    return None;
                }
                Some(r(&a.term, vec![("english", &a.english), ("kana", &a.kana)]))
            }
            MasterKind::Hot => {
                // HOT13 codes must be 13 digits, HOT9 codes 9
                let want = if systems::HOT13.contains(&system) {
                    13
                } else {
                    9
                };
                if code.len() != want {
                    return None;
                }
                let h = self.hot(code)?;
                Some(r(
                    &h.name,
                    vec![("yjCode", &h.yj_code), ("receiptCode", &h.receipt_code)],
                ))
            }
            // no code system: the table is consulted by the e-prescription checks
            MasterKind::Interactions => None,
        }
    }

    /// `CodeSystem/$validate-code`. `None` when the system is not a loaded master.
    pub fn validate_code(
        &self,
        system: &str,
        code: &str,
        display: Option<&str>,
    ) -> Option<ValidateCodeResult> {
        self.master_of(system)?;
        Some(match self.lookup(system, code) {
            None => ValidateCodeResult {
                result: false,
                display: None,
                message: Some(format!(
                    "Code '{code}' is not in the {} master",
                    self.master_name(system).unwrap_or_default()
                )),
            },
            Some(l) => {
                if let Some(a) = self.allergen(code).filter(|a| a.deleted) {
                    return Some(ValidateCodeResult {
                        result: false,
                        display: Some(l.display),
                        message: Some(format!("J-FAGY code '{}' has been deleted", a.code)),
                    });
                }
                let msg = display
                    .filter(|d| *d != l.display)
                    .map(|d| format!("Display '{d}' differs from the master's '{}'", l.display));
                ValidateCodeResult {
                    result: true,
                    display: Some(l.display),
                    message: msg,
                }
            }
        })
    }

    /// A human name of the master behind a system, for messages.
    pub fn master_name(&self, system: &str) -> Option<String> {
        Some(
            match self.master_of(system)? {
                MasterKind::Drug if systems::GENERAL_NAME.contains(&system) => {
                    "drug master (一般名コード)"
                }
                MasterKind::Drug if systems::YJ.contains(&system) => "drug master (YJ code)",
                MasterKind::Drug => "drug master (レセプト電算コード)",
                MasterKind::Disease => "disease-name master",
                MasterKind::Modifier => "modifier master",
                MasterKind::Jlac10 => "JP-CLINS JLAC10 lab item set",
                MasterKind::Jfagy => "J-FAGY allergen code table",
                MasterKind::Interactions => "interactions table (併用禁忌)",
                MasterKind::Hot => "HOT code master",
            }
            .to_string(),
        )
    }

    /// Whether an unknown code in `system` should be an error (true) or only a
    /// warning: YJ codes are published outside the claims master, which lags
    /// behind, so an unknown YJ code is only a warning. The same holds for HOT
    /// codes: MEDIS publishes new ones monthly, before a node imports them.
    pub fn strict_system(system: &str) -> bool {
        !(systems::YJ.contains(&system)
            || systems::HOT9.contains(&system)
            || systems::HOT13.contains(&system))
    }
}
