//! The one-way extraction (抽出): primary store (read-only) → pseudonymised Parquet
//! files in a separate research data directory.
//!
//! Per table ([`crate::schema::TABLES`]) it pages the store's current versions,
//! drops every resource of a person in the opt-out snapshot, replaces the person
//! id by the dataset pseudonym from the linkage service, keeps only the schema's
//! safe fields and writes Parquet (Snappy). The dataset is written to a `.partial`
//! directory and renamed at the end, so the research side never sees half an
//! extract. `manifest.json` records the opt-out snapshot applied, row counts and
//! coverage periods; the catalogue is built from it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, NaiveDate, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Value, json};
use tsunagi_fhir::index::compartment_patient;
use tsunagi_store::{Store, StoredResource};

use crate::linkage::LinkageKey;
use crate::optout::OptOutSnapshot;
use crate::schema::{Kind, TABLES, TableDef};

/// Rows per Parquet row group / Arrow batch.
const BATCH_ROWS: usize = 65_536;
/// Resources read from the store per page.
const PAGE: usize = 1_000;

#[derive(Debug, Clone)]
pub struct ExtractConfig {
    /// Dataset id (letters, digits, `-`, `_`); also the pseudonym domain.
    pub dataset: String,
    /// The research data directory; the dataset goes to `<dir>/datasets/<dataset>/`.
    pub research_dir: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    pub name: String,
    pub rows: u64,
    /// Resources left out because their person opted out.
    #[serde(rename = "optedOutSkipped")]
    pub opted_out_skipped: u64,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractReport {
    pub dataset: String,
    pub dir: PathBuf,
    pub tables: Vec<TableReport>,
    pub manifest: Value,
}

pub fn valid_dataset_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

enum Col {
    Text(StringBuilder),
    Date(Date32Builder),
    Number(Float64Builder),
    Bool(BooleanBuilder),
}

/// One value of a row, in the table's column order.
pub enum Cell {
    Text(Option<String>),
    Date(Option<i32>),
    Number(Option<f64>),
    Bool(Option<bool>),
}

struct TableWriter {
    def: &'static TableDef,
    schema: SchemaRef,
    cols: Vec<Col>,
    pending: usize,
    writer: ArrowWriter<File>,
    rows: u64,
    skipped: u64,
    period_idx: Option<usize>,
    min: Option<i32>,
    max: Option<i32>,
}

pub fn arrow_schema(def: &TableDef) -> SchemaRef {
    Arc::new(Schema::new(
        def.columns
            .iter()
            .map(|c| {
                let dt = match c.kind {
                    Kind::Text => DataType::Utf8,
                    Kind::Date => DataType::Date32,
                    Kind::Number => DataType::Float64,
                    Kind::Boolean => DataType::Boolean,
                };
                Field::new(c.name, dt, c.name != "pid")
            })
            .collect::<Vec<_>>(),
    ))
}

fn new_cols(def: &TableDef) -> Vec<Col> {
    def.columns
        .iter()
        .map(|c| match c.kind {
            Kind::Text => Col::Text(StringBuilder::new()),
            Kind::Date => Col::Date(Date32Builder::new()),
            Kind::Number => Col::Number(Float64Builder::new()),
            Kind::Boolean => Col::Bool(BooleanBuilder::new()),
        })
        .collect()
}

impl TableWriter {
    fn open(def: &'static TableDef, dir: &Path) -> anyhow::Result<TableWriter> {
        let schema = arrow_schema(def);
        let file = File::create(dir.join(format!("{}.parquet", def.name)))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(BATCH_ROWS * 4))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        Ok(TableWriter {
            def,
            schema,
            cols: new_cols(def),
            pending: 0,
            writer,
            rows: 0,
            skipped: 0,
            period_idx: def
                .period_column
                .and_then(|p| def.columns.iter().position(|c| c.name == p)),
            min: None,
            max: None,
        })
    }

    fn push(&mut self, cells: Vec<Cell>) -> anyhow::Result<()> {
        for (i, (col, cell)) in self.cols.iter_mut().zip(cells).enumerate() {
            match (col, cell) {
                (Col::Text(b), Cell::Text(v)) => b.append_option(v),
                (Col::Date(b), Cell::Date(v)) => {
                    if Some(i) == self.period_idx
                        && let Some(d) = v
                    {
                        self.min = Some(self.min.map_or(d, |m| m.min(d)));
                        self.max = Some(self.max.map_or(d, |m| m.max(d)));
                    }
                    b.append_option(v)
                }
                (Col::Number(b), Cell::Number(v)) => b.append_option(v),
                (Col::Bool(b), Cell::Bool(v)) => b.append_option(v),
                _ => bail!("cell type does not match column {i} of {}", self.def.name),
            }
        }
        self.pending += 1;
        self.rows += 1;
        if self.pending >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let arrays: Vec<ArrayRef> = self
            .cols
            .iter_mut()
            .map(|c| -> ArrayRef {
                match c {
                    Col::Text(b) => Arc::new(b.finish()),
                    Col::Date(b) => Arc::new(b.finish()),
                    Col::Number(b) => Arc::new(b.finish()),
                    Col::Bool(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)?;
        self.writer.write(&batch)?;
        self.pending = 0;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<TableReport> {
        self.flush()?;
        self.writer.close()?;
        let fmt = |d: Option<i32>| d.map(|d| date_from_days(d).to_string());
        Ok(TableReport {
            name: self.def.name.to_string(),
            rows: self.rows,
            opted_out_skipped: self.skipped,
            from: fmt(self.min),
            to: fmt(self.max),
        })
    }
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date")
}

pub fn date_from_days(d: i32) -> NaiveDate {
    epoch() + chrono::Duration::days(d as i64)
}

/// Days since 1970-01-01 of the date part of a FHIR date/dateTime (its local date
/// as written, i.e. the Japan date for platform data).
pub fn days(s: &str) -> Option<i32> {
    let d = match s.len() {
        4 => NaiveDate::parse_from_str(&format!("{s}-01-01"), "%Y-%m-%d").ok()?,
        7 => NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").ok()?,
        _ => NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()?,
    };
    Some((d - epoch()).num_days() as i32)
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = match cur {
            Value::Array(a) => a.first()?.get(p)?,
            _ => cur.get(p)?,
        };
    }
    // A repeating element ends the path (e.g. AllergyIntolerance.category): its first value.
    match cur {
        Value::Array(a) => a.first(),
        _ => Some(cur),
    }
}

fn text(v: &Value, path: &[&str]) -> Cell {
    Cell::Text(at(v, path).and_then(Value::as_str).map(str::to_string))
}

fn date(v: &Value, paths: &[&[&str]]) -> Cell {
    Cell::Date(
        paths
            .iter()
            .find_map(|p| at(v, p).and_then(Value::as_str))
            .and_then(days),
    )
}

fn number(v: &Value, path: &[&str]) -> Cell {
    Cell::Number(at(v, path).and_then(Value::as_f64))
}

/// (system, code, display) of the first coding of a CodeableConcept.
fn coding(v: &Value, element: &str) -> [Cell; 3] {
    [
        text(v, &[element, "coding", "system"]),
        text(v, &[element, "coding", "code"]),
        text(v, &[element, "coding", "display"]),
    ]
}

/// The safe cells of one resource, `pid` first; None when the type is not extracted.
pub fn cells(def: &TableDef, r: &Value, pid: String) -> Vec<Cell> {
    let mut out = vec![Cell::Text(Some(pid))];
    match def.resource_type {
        "Patient" => {
            out.push(text(r, &["gender"]));
            out.push(date(r, &[&["birthDate"]]));
            let deceased = r
                .get("deceasedBoolean")
                .and_then(Value::as_bool)
                .or_else(|| r.get("deceasedDateTime").map(|_| true));
            out.push(Cell::Bool(Some(deceased.unwrap_or(false))));
        }
        "Condition" => {
            out.extend(coding(r, "code"));
            out.push(text(r, &["clinicalStatus", "coding", "code"]));
            out.push(text(r, &["verificationStatus", "coding", "code"]));
            out.push(date(r, &[&["onsetDateTime"], &["onsetPeriod", "start"]]));
            out.push(date(r, &[&["recordedDate"]]));
        }
        "Observation" => {
            out.push(text(r, &["category", "coding", "code"]));
            out.extend(coding(r, "code"));
            out.push(date(
                r,
                &[
                    &["effectiveDateTime"],
                    &["effectivePeriod", "start"],
                    &["issued"],
                ],
            ));
            out.push(number(r, &["valueQuantity", "value"]));
            out.push(text(r, &["valueQuantity", "unit"]));
            out.push(text(r, &["valueCodeableConcept", "coding", "code"]));
            out.push(text(r, &["interpretation", "coding", "code"]));
        }
        "AllergyIntolerance" => {
            out.extend(coding(r, "code"));
            out.push(text(r, &["category"]));
            out.push(text(r, &["criticality"]));
            out.push(text(r, &["clinicalStatus", "coding", "code"]));
            out.push(date(r, &[&["recordedDate"]]));
        }
        "MedicationRequest" => {
            out.extend(coding(r, "medicationCodeableConcept"));
            out.push(text(r, &["status"]));
            out.push(date(r, &[&["authoredOn"]]));
            out.push(number(
                r,
                &["dosageInstruction", "doseAndRate", "doseQuantity", "value"],
            ));
            out.push(text(
                r,
                &["dosageInstruction", "doseAndRate", "doseQuantity", "unit"],
            ));
            out.push(number(
                r,
                &["dispenseRequest", "expectedSupplyDuration", "value"],
            ));
        }
        "MedicationDispense" => {
            out.extend(coding(r, "medicationCodeableConcept"));
            out.push(text(r, &["status"]));
            out.push(date(r, &[&["whenHandedOver"], &["whenPrepared"]]));
            out.push(number(r, &["quantity", "value"]));
            out.push(text(r, &["quantity", "unit"]));
            out.push(number(r, &["daysSupply", "value"]));
        }
        _ => unreachable!("every schema table has a resource type handled above"),
    }
    out
}

/// Writes the tables of one dataset. [`Extractor::push`] takes resources from any
/// source (the store pager in [`run`], or the benchmark's generator).
pub struct Extractor<'k> {
    dataset: String,
    key: &'k LinkageKey,
    optout: OptOutSnapshot,
    partial: PathBuf,
    final_dir: PathBuf,
    writers: BTreeMap<&'static str, TableWriter>,
    pseudonyms: std::collections::HashMap<String, String>,
}

impl<'k> Extractor<'k> {
    pub fn new(
        cfg: &ExtractConfig,
        key: &'k LinkageKey,
        optout: OptOutSnapshot,
    ) -> anyhow::Result<Extractor<'k>> {
        if !valid_dataset_id(&cfg.dataset) {
            bail!("dataset id must be 1-64 letters, digits, '-' or '_'");
        }
        let base = cfg.research_dir.join("datasets");
        let final_dir = base.join(&cfg.dataset);
        if final_dir.exists() {
            bail!(
                "dataset {} already exists in {}; extractions are never overwritten, use a new dataset id",
                cfg.dataset,
                base.display()
            );
        }
        let partial = base.join(format!(".{}.partial", cfg.dataset));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let mut writers = BTreeMap::new();
        for def in TABLES {
            writers.insert(def.resource_type, TableWriter::open(def, &partial)?);
        }
        Ok(Extractor {
            dataset: cfg.dataset.clone(),
            key,
            optout,
            partial,
            final_dir,
            writers,
            pseudonyms: Default::default(),
        })
    }

    /// Adds one resource of its person `person` (the Patient id). Resources of
    /// opted-out persons are counted and dropped.
    pub fn push(&mut self, resource_type: &str, person: &str, r: &Value) -> anyhow::Result<()> {
        let Some(w) = self.writers.get_mut(resource_type) else {
            return Ok(());
        };
        if self.optout.persons.contains(person) {
            w.skipped += 1;
            return Ok(());
        }
        let pid = match self.pseudonyms.get(person) {
            Some(p) => p.clone(),
            None => {
                let p = self.key.pseudonym(&self.dataset, person);
                self.pseudonyms.insert(person.to_string(), p.clone());
                p
            }
        };
        let def = w.def;
        w.push(cells(def, r, pid))
    }

    /// Closes the files, writes the manifest and publishes the dataset directory.
    pub fn finish(self, source: &str) -> anyhow::Result<ExtractReport> {
        let mut tables = Vec::new();
        let mut reports = Vec::new();
        for (_, w) in self.writers {
            let def = w.def;
            let rep = w.finish()?;
            tables.push(json!({
                "name": def.name,
                "file": format!("{}.parquet", def.name),
                "resourceType": def.resource_type,
                "meaning": def.meaning,
                "rows": rep.rows,
                "periodColumn": def.period_column,
                "coverage": {"from": rep.from, "to": rep.to},
                "columns": def.columns,
            }));
            reports.push(rep);
        }
        let extracted_at: DateTime<Utc> = Utc::now();
        let manifest = json!({
            "dataset": self.dataset,
            "extractedAt": extracted_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "source": source,
            "form": "pseudonymised",
            "pseudonym": "pid = HMAC-SHA256(linkage key, dataset, person id), 128 bits hex; per dataset",
            "optOutSnapshot": {
                "id": self.optout.id,
                "takenAt": self.optout.taken_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "persons": self.optout.persons.len(),
            },
            "persons": self.pseudonyms.len(),
            "tables": tables,
        });
        std::fs::write(
            self.partial.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        std::fs::rename(&self.partial, &self.final_dir)?;
        Ok(ExtractReport {
            dataset: self.dataset,
            dir: self.final_dir,
            tables: reports,
            manifest,
        })
    }
}

/// Calls `f` with every current resource of `resource_type`, in id order, read
/// in keyset pages ([`Store::scan`]) so each page costs the same at any depth.
pub(crate) fn each_current(
    store: &dyn Store,
    resource_type: &str,
    mut f: impl FnMut(StoredResource) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan(resource_type, after.as_deref(), PAGE)
            .map_err(|e| anyhow::anyhow!("reading {resource_type}: {e}"))?;
        let n = page.len();
        after = page.last().map(|s| s.id.clone());
        for s in page {
            f(s)?;
        }
        if n < PAGE {
            return Ok(());
        }
    }
}

/// Runs a full extraction from the primary store: takes the opt-out snapshot,
/// pages every extracted type (current versions, read-only), writes the dataset
/// and appends one `research-extraction` record to the primary audit trail.
pub fn run(
    store: &dyn Store,
    cfg: &ExtractConfig,
    key: &LinkageKey,
    snapshot_dir: Option<&Path>,
) -> anyhow::Result<ExtractReport> {
    let snapshot = OptOutSnapshot::take(store).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(dir) = snapshot_dir {
        snapshot.save(dir)?;
    }
    let snapshot_id = snapshot.id.clone();
    let mut ex = Extractor::new(cfg, key, snapshot)?;
    for def in TABLES {
        each_current(store, def.resource_type, |s| {
            let Some(r) = &s.resource else { return Ok(()) };
            let person = if def.resource_type == "Patient" {
                Some(s.id.clone())
            } else {
                compartment_patient(def.resource_type, r)
            };
            // Resources of no person are not personal data for a person-level extract.
            if let Some(p) = person {
                ex.push(def.resource_type, &p, r)?;
            }
            Ok(())
        })?;
    }
    let report = ex.finish(&format!("tsunagi primary store ({})", store.backend()))?;
    let rec = json!({
        "time": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "org": crate::optout::SERVICE_ORG,
        "user": null,
        "role": "operator",
        "purpose": "research",
        "action": "research-extraction",
        "patient": null,
        "resources": [format!("dataset/{}", report.dataset)],
        "outcome": "success",
        "status": 200,
        "reason": format!(
            "opt-out snapshot {snapshot_id}; rows {}",
            report.tables.iter().map(|t| format!("{}={}", t.name, t.rows)).collect::<Vec<_>>().join(",")
        ),
        "request_id": uuid::Uuid::new_v4().to_string(),
    });
    store
        .audit_append(&[rec])
        .map_err(|e| anyhow::anyhow!("audit: {e}"))?;
    Ok(report)
}
