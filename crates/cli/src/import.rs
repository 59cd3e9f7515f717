//! `tsunagi import`: NDJSON bulk load.
//!
//! Each line is one resource. Lines are written in batches, one transaction each;
//! a resource keeps its id (so re-running an import is idempotent: it adds a
//! version rather than a duplicate). A bad line is reported with its line number
//! and never aborts the rest; a batch the store refuses is retried line by line so
//! only the offending lines fail, and nothing is half-applied. Every line passes the
//! same validator as the API (installed packages and the platform's rules) unless
//! the operator says `--skip-validation`, which the audit records say.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tsunagi_fhir::FhirResult;
use tsunagi_fhir::index::compartment_patient;
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_server::validate::check_shape;
use tsunagi_store::{Store, WriteContext};

use crate::options::DataArgs;

#[derive(Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// NDJSON file: one FHIR resource per line.
    pub file: PathBuf,
    /// Resources per transaction.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Operator organisation code recorded in the audit trail.
    #[arg(long, default_value = "operator")]
    pub org: String,
    /// Operator user recorded in the audit trail.
    #[arg(long, env = "USER", default_value = "operator")]
    pub user: String,
    /// Do not validate (only for data already validated by this platform, e.g. a
    /// re-import of an export). Recorded in every audit record of the import.
    #[arg(long)]
    pub skip_validation: bool,
}

/// Outcome of an import.
#[derive(Debug, Default)]
pub struct Stats {
    pub imported: u64,
    pub failed: Vec<(u64, String)>,
    pub seconds: f64,
}

pub fn run(args: ImportArgs) -> anyhow::Result<u8> {
    let (cfg, store) = args.data.open_for(tsunagi_store::Workload::BulkLoad)?;
    let validator = if args.skip_validation {
        None
    } else {
        Some(tsunagi_validation::Validator::load(&cfg.data_dir)?)
    };
    let file =
        File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let actor = Principal::new(
        &args.org,
        OrgKind::Operator,
        vec![],
        Role::Operator,
        Some(args.user.clone()),
        None,
        false,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stats = import_reader(
        &*store,
        validator.as_ref(),
        BufReader::new(file),
        args.batch.max(1),
        &actor,
        |bytes, done| {
            bar.set_position(bytes);
            bar.set_message(format!("{done} resources"));
        },
    )?;
    bar.finish_and_clear();
    for (line, err) in &stats.failed {
        eprintln!("line {line}: {err}");
    }
    println!(
        "imported {} resources in {:.1}s ({:.0}/s); {} line(s) failed",
        stats.imported,
        stats.seconds,
        stats.imported as f64 / stats.seconds.max(1e-9),
        stats.failed.len()
    );
    Ok(if stats.failed.is_empty() { 0 } else { 1 })
}

/// Imports NDJSON from a reader. `progress(bytes_read, imported)` is called per batch.
/// Without a validator, lines are only checked for shape (`--skip-validation`).
pub fn import_reader(
    store: &dyn Store,
    validator: Option<&tsunagi_validation::Validator>,
    reader: impl BufRead + Send,
    batch: usize,
    actor: &Principal,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Stats> {
    let validated = validator.is_some();
    let started = Instant::now();
    let mut stats = Stats::default();
    // Parsing and validation (CPU) run on a second thread, one batch ahead of the
    // writer, so the two overlap instead of taking turns.
    let (tx, rx) = std::sync::mpsc::sync_channel::<ParsedBatch>(2);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let producer = scope.spawn(move || -> anyhow::Result<()> {
            let mut batch_out = ParsedBatch::with_capacity(batch);
            let mut bytes = 0u64;
            for (i, line) in reader.lines().enumerate() {
                let line_no = i as u64 + 1;
                let line = line.with_context(|| format!("reading line {line_no}"))?;
                bytes += line.len() as u64 + 1;
                if line.trim().is_empty() {
                    continue;
                }
                match parse_line(&line, validator) {
                    Ok((rt, id, v)) => batch_out.rows.push((line_no, rt, id, v)),
                    Err(e) => batch_out.failed.push((line_no, e)),
                }
                if batch_out.rows.len() >= batch {
                    batch_out.bytes = bytes;
                    let full = std::mem::replace(&mut batch_out, ParsedBatch::with_capacity(batch));
                    if tx.send(full).is_err() {
                        return Ok(()); // writer gone: it reports its own error
                    }
                }
            }
            batch_out.bytes = bytes;
            let _ = tx.send(batch_out);
            Ok(())
        });
        for mut b in rx {
            stats.failed.append(&mut b.failed);
            flush(store, &mut b.rows, actor, validated, &mut stats);
            progress(b.bytes, stats.imported);
        }
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("the parsing thread panicked"))?
    })?;
    stats.failed.sort_by_key(|(line, _)| *line);
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Parsed lines on their way from the parsing thread to the writer.
struct ParsedBatch {
    rows: Vec<(u64, String, String, Value)>,
    failed: Vec<(u64, String)>,
    /// Bytes read up to the end of this batch (progress).
    bytes: u64,
}

impl ParsedBatch {
    fn with_capacity(n: usize) -> Self {
        ParsedBatch {
            rows: Vec::with_capacity(n),
            failed: Vec::new(),
            bytes: 0,
        }
    }
}

fn parse_line(
    line: &str,
    validator: Option<&tsunagi_validation::Validator>,
) -> Result<(String, String, Value), String> {
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    check_shape(&v, None).map_err(|e| {
        e.issues
            .iter()
            .map(|i| i.message.clone())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    if let Some(validator) = validator {
        let issues = validator.validate(&v, None);
        if tsunagi_validation::has_errors(&issues) {
            return Err(issues
                .iter()
                .filter(|i| i.severity >= tsunagi_fhir::Severity::Error)
                .map(|i| format!("{}: {}", i.expression.as_deref().unwrap_or("-"), i.message))
                .collect::<Vec<_>>()
                .join("; "));
        }
    }
    let rt = v["resourceType"].as_str().unwrap_or_default().to_string();
    let id = match v.get("id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            v["id"] = Value::String(id.clone());
            id
        }
    };
    Ok((rt, id, v))
}

fn flush(
    store: &dyn Store,
    pending: &mut Vec<(u64, String, String, Value)>,
    actor: &Principal,
    validated: bool,
    stats: &mut Stats,
) {
    if pending.is_empty() {
        return;
    }
    let rows = std::mem::take(pending);
    match write_batch(store, &rows, actor, validated) {
        Ok(()) => stats.imported += rows.len() as u64,
        Err(_) => {
            // Isolate the offending rows: each on its own, so good rows still land.
            for row in rows {
                match write_batch(store, std::slice::from_ref(&row), actor, validated) {
                    Ok(()) => stats.imported += 1,
                    Err(e) => stats.failed.push((row.0, e.to_string())),
                }
            }
        }
    }
}

/// One transaction: the resources and one audit record per patient touched.
fn write_batch(
    store: &dyn Store,
    rows: &[(u64, String, String, Value)],
    actor: &Principal,
    validated: bool,
) -> FhirResult<()> {
    let ctx = WriteContext {
        org: Some(actor.org.clone()),
        user: actor.user.clone(),
    };
    let mut tx = store.begin()?;
    let mut touched: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for (_, rt, id, v) in rows {
        let patient = compartment_patient(rt, v);
        let (stored, _) = tx.update(rt, id, v.clone(), None, &ctx)?;
        if patient.is_some() {
            touched
                .entry(patient)
                .or_default()
                .push(format!("{rt}/{id}/_history/{}", stored.version));
        }
    }
    let records: Vec<Value> = touched
        .into_iter()
        .map(|(patient, refs)| {
            let mut rec = AuditRecord::new(
                actor,
                Purpose::Operations,
                "import",
                uuid::Uuid::new_v4().to_string(),
            )
            .with_patient(patient)
            .with_resources(refs);
            if !validated {
                rec.reason = Some("imported with --skip-validation".into());
            }
            rec.to_json()
        })
        .collect();
    if !records.is_empty() {
        tx.audit_append(&records)?;
    }
    tx.commit()
}
