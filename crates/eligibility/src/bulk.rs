//! Bulk coverage files (資格情報の一括登録): NDJSON or CSV, streamed, resumable, with a
//! per-row error report.
//!
//! - The file is read line by line, never loaded whole. CSV has a header row naming
//!   the columns ([`crate::coverage::FIELDS`]; order free, unknown columns refused);
//!   a field may be double-quoted (`""` inside quotes is a quote); a record is one
//!   line. NDJSON has one flat JSON object per line with the same keys.
//! - Rows are written in batches, one transaction each. A row is all-or-nothing
//!   (person + coverage + its audit record): when any row of a batch fails, the
//!   batch is rolled back and its rows are replayed one transaction each, so only
//!   the bad rows fail. A bad row never aborts the import.
//! - After each committed batch, `FILE.checkpoint` holds the last committed line;
//!   `--resume` continues after it. Re-applying a batch (crash between commit and
//!   checkpoint) is harmless: unchanged registrations write nothing.
//! - `FILE.errors.csv` lists `line,field,element,reason` for every failed row.
//! - Every person written is audited (one record per person, purpose insurer,
//!   action `register-coverage`) in the same transaction as the write.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use axum::Router;
use serde_json::Value;
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{Principal, Purpose};
use tsunagi_policy::policy::Policy;
use tsunagi_server::AppState;
use tsunagi_store::Store;

use crate::coverage::{FIELDS, FieldError, RegisterError, Registrar, Registration, today_jst};

pub fn routes() -> Router<AppState> {
    Router::new()
}

/// Input format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Ndjson,
}

impl Format {
    /// From the file extension (`.csv` is CSV, anything else NDJSON).
    pub fn guess(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => Format::Csv,
            _ => Format::Ndjson,
        }
    }
}

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
pub fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                cur.push(c);
            }
        } else if c == '"' && at_start {
            quoted = true;
            at_start = false;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
            at_start = true;
        } else {
            cur.push(c);
            at_start = false;
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    out.push(cur);
    Ok(out)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Options of one import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub file: PathBuf,
    pub format: Format,
    pub resume: bool,
    pub batch: usize,
}

/// Outcome of an import.
#[derive(Debug, Default, Clone)]
pub struct ImportStats {
    pub imported: u64,
    pub failed: u64,
    /// Lines skipped because a checkpoint said they were committed.
    pub resumed_after: u64,
    /// Rows among those skipped lines that an earlier run reported as failed (from
    /// the error report), so a resumed import still ends with a failure status.
    pub failed_before_resume: u64,
    pub seconds: f64,
}

impl ImportStats {
    /// Failed rows of the whole file, this run and the runs it resumed.
    pub fn failed_in_file(&self) -> u64 {
        self.failed + self.failed_before_resume
    }
}

/// Distinct line numbers up to `last_line` in an existing error report.
fn failed_lines_up_to(report: &Path, last_line: u64) -> anyhow::Result<u64> {
    let text = match std::fs::read_to_string(report) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", report.display())),
    };
    let lines: std::collections::BTreeSet<u64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse::<u64>().ok())
        .filter(|&n| n <= last_line)
        .collect();
    Ok(lines.len() as u64)
}

pub fn checkpoint_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".checkpoint");
    PathBuf::from(s)
}

pub fn errors_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".errors.csv");
    PathBuf::from(s)
}

fn read_checkpoint(file: &Path) -> anyhow::Result<u64> {
    let p = checkpoint_path(file);
    match std::fs::read_to_string(&p) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("checkpoint {} is not a line number", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn write_checkpoint(file: &Path, line: u64) -> anyhow::Result<()> {
    let p = checkpoint_path(file);
    let tmp = p.with_extension("checkpoint.tmp");
    std::fs::write(&tmp, format!("{line}\n"))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// One failed row, for the error report.
#[derive(Debug, Clone)]
pub struct RowError {
    pub line: u64,
    pub field: String,
    pub element: String,
    pub reason: String,
}

impl RowError {
    fn from_field(line: u64, e: &FieldError) -> Self {
        RowError {
            line,
            field: e.field.clone(),
            element: e.element.clone(),
            reason: e.reason.clone(),
        }
    }
    fn whole(line: u64, reason: impl Into<String>) -> Self {
        RowError {
            line,
            field: String::new(),
            element: String::new(),
            reason: reason.into(),
        }
    }
}

/// Imports `opts.file` as insurer staff `actor`. `progress(bytes, imported, failed)`
/// is called after every batch.
pub fn import_file(
    store: &dyn Store,
    policy: &Policy,
    actor: &Principal,
    opts: &ImportOptions,
    mut progress: impl FnMut(u64, u64, u64),
) -> anyhow::Result<ImportStats> {
    let started = Instant::now();
    let file =
        File::open(&opts.file).with_context(|| format!("opening {}", opts.file.display()))?;
    let resume_after = if opts.resume {
        read_checkpoint(&opts.file)?
    } else {
        0
    };
    let mut errors_out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(opts.resume)
        .truncate(!opts.resume)
        .open(errors_path(&opts.file))
        .with_context(|| format!("opening {}", errors_path(&opts.file).display()))?;
    if errors_out.seek(SeekFrom::End(0))? == 0 {
        writeln!(errors_out, "line,field,element,reason")?;
    }
    let failed_before_resume = if opts.resume {
        failed_lines_up_to(&errors_path(&opts.file), resume_after)?
    } else {
        0
    };
    let mut stats = ImportStats {
        resumed_after: resume_after,
        failed_before_resume,
        ..Default::default()
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut columns: Option<Vec<usize>> = None; // CSV column index -> FIELDS index
    let mut pending: Vec<(u64, Registration)> = Vec::with_capacity(opts.batch);
    let mut batch_errors: Vec<RowError> = Vec::new();
    let mut bytes = 0u64;
    let mut line_no = 0u64;
    let mut buf = String::new();
    let batch = opts.batch.max(1);
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        line_no += 1;
        let line = buf.trim_end_matches(['\n', '\r']);
        if opts.format == Format::Csv && line_no == 1 {
            let header = split_csv(line.trim_start_matches('\u{feff}'))
                .map_err(|e| anyhow::anyhow!("CSV header: {e}"))?;
            let mut idx = Vec::new();
            for h in &header {
                match FIELDS.iter().position(|f| *f == h.trim()) {
                    Some(i) => idx.push(i),
                    None => bail!(
                        "CSV header: unknown column '{h}' (expected: {})",
                        FIELDS.join(",")
                    ),
                }
            }
            columns = Some(idx);
            continue;
        }
        if line_no <= resume_after || line.trim().is_empty() {
            continue;
        }
        let parsed = match opts.format {
            Format::Csv => match split_csv(line) {
                Ok(vals) => {
                    let cols = columns.as_ref().expect("header read");
                    if vals.len() != cols.len() {
                        Err(vec![RowError::whole(
                            line_no,
                            format!("{} fields, the header has {}", vals.len(), cols.len()),
                        )])
                    } else {
                        let map: HashMap<&str, &str> = cols
                            .iter()
                            .zip(vals.iter())
                            .map(|(&i, v)| (FIELDS[i], v.as_str()))
                            .collect();
                        Registration::from_fields(&|f| map.get(f).map(|s| s.to_string())).map_err(
                            |errs| {
                                errs.iter()
                                    .map(|e| RowError::from_field(line_no, e))
                                    .collect()
                            },
                        )
                    }
                }
                Err(e) => Err(vec![RowError::whole(line_no, e)]),
            },
            Format::Ndjson => match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => Registration::from_object(&v).map_err(|errs| {
                    errs.iter()
                        .map(|e| RowError::from_field(line_no, e))
                        .collect()
                }),
                Ok(_) => Err(vec![RowError::whole(
                    line_no,
                    "a line must be a JSON object",
                )]),
                Err(e) => Err(vec![RowError::whole(
                    line_no,
                    format!("not valid JSON: {e}"),
                )]),
            },
        };
        match parsed {
            Ok(r) => pending.push((line_no, r)),
            Err(errs) => {
                stats.failed += 1;
                batch_errors.extend(errs);
            }
        }
        if pending.len() >= batch {
            flush(
                store,
                policy,
                actor,
                &mut pending,
                &mut batch_errors,
                &mut stats,
            )?;
            finish_batch(&mut errors_out, &mut batch_errors, &opts.file, line_no)?;
            progress(bytes, stats.imported, stats.failed);
        }
    }
    flush(
        store,
        policy,
        actor,
        &mut pending,
        &mut batch_errors,
        &mut stats,
    )?;
    finish_batch(&mut errors_out, &mut batch_errors, &opts.file, line_no)?;
    progress(bytes, stats.imported, stats.failed);
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

fn finish_batch(
    out: &mut File,
    errors: &mut Vec<RowError>,
    file: &Path,
    line: u64,
) -> anyhow::Result<()> {
    errors.sort_by_key(|e| e.line);
    for e in errors.drain(..) {
        writeln!(
            out,
            "{},{},{},{}",
            e.line,
            csv_field(&e.field),
            csv_field(&e.element),
            csv_field(&e.reason)
        )?;
    }
    out.flush()?;
    write_checkpoint(file, line)
}

/// Writes the pending rows: one transaction for the batch, or row by row when any fails.
fn flush(
    store: &dyn Store,
    policy: &Policy,
    actor: &Principal,
    pending: &mut Vec<(u64, Registration)>,
    errors: &mut Vec<RowError>,
    stats: &mut ImportStats,
) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let rows = std::mem::take(pending);
    let registrar = Registrar {
        principal: actor,
        policy,
        validator: None,
        request_id: uuid::Uuid::new_v4().to_string(),
        today: today_jst(),
    };
    let whole = (|| -> Result<(), RegisterError> {
        let mut tx = store.begin()?;
        for (_, reg) in &rows {
            registrar.register_in(&mut *tx, reg)?;
        }
        tx.commit()?;
        Ok(())
    })();
    if whole.is_ok() {
        stats.imported += rows.len() as u64;
        return Ok(());
    }
    for (line, reg) in &rows {
        let one = (|| -> Result<(), RegisterError> {
            let mut tx = store.begin()?;
            registrar.register_in(&mut *tx, reg)?;
            tx.commit()?;
            Ok(())
        })();
        match one {
            Ok(()) => stats.imported += 1,
            Err(e) => {
                stats.failed += 1;
                match e {
                    RegisterError::Invalid(fe) => {
                        errors.extend(fe.iter().map(|f| RowError::from_field(*line, f)))
                    }
                    RegisterError::Denied {
                        patient,
                        resources,
                        reason,
                    } => {
                        let mut rec = AuditRecord::new(
                            actor,
                            Purpose::Insurer,
                            "register-coverage",
                            registrar.request_id.clone(),
                        )
                        .with_patient(patient)
                        .with_resources(resources);
                        rec.outcome = tsunagi_policy::audit::Outcome::Denied;
                        rec.status = 403;
                        rec.reason = Some(reason.clone());
                        store
                            .audit_append(&[rec.to_json()])
                            .map_err(|e| anyhow::anyhow!("audit: {e}"))?;
                        errors.push(RowError::whole(*line, format!("denied: {reason}")));
                    }
                    RegisterError::Store(fe) => errors.push(RowError {
                        line: *line,
                        field: String::new(),
                        element: fe
                            .issues
                            .first()
                            .and_then(|i| i.expression.clone())
                            .unwrap_or_default(),
                        reason: fe.to_string(),
                    }),
                }
            }
        }
    }
    Ok(())
}

/// Deterministic synthetic data for benchmarks and tests: person `i` of `n`.
pub mod synth {
    use serde_json::{Value, json};
    use tsunagi_policy::ids::mod10_w21_check_digit;

    /// A valid 8-digit 保険者番号 (法別 06, Tokyo) for insurer number `k`.
    pub fn insurer_number(k: u32) -> String {
        let body = format!("0613{:03}", k % 1000);
        let d: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
        format!("{body}{}", mod10_w21_check_digit(&d))
    }

    /// (insurerNumber, symbol, number, branch, birthDate) of person `i`.
    pub fn keys(i: u64, insurer: &str) -> (String, String, String, String, String) {
        let symbol = format!("{}", 100 + i / 10_000);
        let number = format!("{}", 1_000_000 + i);
        let branch = if i % 5 == 4 { "01" } else { "00" }.to_string();
        let y = 1930 + (i % 90);
        let m = 1 + (i / 90) % 12;
        let d = 1 + (i / 1080) % 28;
        (
            insurer.to_string(),
            symbol,
            number,
            branch,
            format!("{y:04}-{m:02}-{d:02}"),
        )
    }

    /// The linkage id (機関別符号 stand-in) of person `i`.
    pub fn linkage_id(i: u64) -> String {
        format!("LINK-{i:012}")
    }

    /// One NDJSON registration line of person `i`.
    pub fn row(i: u64, insurer: &str) -> Value {
        let (ins, symbol, number, branch, birth) = keys(i, insurer);
        let family = ["山田", "佐藤", "鈴木", "高橋", "田中"][(i % 5) as usize];
        let kana = ["ヤマダ", "サトウ", "スズキ", "タカハシ", "タナカ"][(i % 5) as usize];
        json!({
            "linkageId": linkage_id(i),
            "insurerNumber": ins, "symbol": symbol, "number": number, "branch": branch,
            "relationship": if branch == "00" { "self" } else { "family" },
            "copayPercent": 30, "start": "2024-04-01",
            "limitCategory": "u",
            "familyName": family, "givenName": "花子", "familyNameKana": kana, "givenNameKana": "ハナコ",
            "gender": if i.is_multiple_of(2) { "female" } else { "male" },
            "birthDate": birth, "postalCode": "100-0001", "address": format!("東京都千代田区千代田{}", i % 100)
        })
    }
}

pub mod cli {
    use std::io::{BufWriter, Write};
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::Context;
    use indicatif::{ProgressBar, ProgressStyle};
    use tsunagi_policy::identity::{OrgKind, Principal, Role};
    use tsunagi_policy::policy::Policy;
    use tsunagi_server::{ServerConfig, latency};

    use super::{Format, ImportOptions, errors_path, import_file, synth};

    /// `tsunagi coverage ...`
    #[derive(Debug, clap::Args)]
    pub struct CoverageArgs {
        #[command(subcommand)]
        pub command: CoverageCommand,
    }

    #[derive(Debug, clap::Subcommand)]
    pub enum CoverageCommand {
        /// Imports an insurer's coverage file (NDJSON or CSV); resumable; writes
        /// FILE.errors.csv and FILE.checkpoint. Exit 1 when any row failed.
        Import(ImportArgs),
        /// Writes a synthetic coverage file of N persons (benchmarks, demos).
        Generate(GenerateArgs),
        /// Load generator: drives `$eligibility` (or card receptions) with concurrent
        /// clients against a running server and prints throughput and latency percentiles.
        Loadgen(LoadgenArgs),
        /// Issues My Number card certificates to generated persons and writes the cards
        /// (key + certificate, one JSON per line) for `loadgen --mode reception`.
        Cards(CardsArgs),
    }

    /// What the load generator drives.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    pub enum LoadMode {
        /// `POST /fhir/$eligibility` by insurance number and birth date (資格確認書).
        Eligibility,
        /// A card reception: `$reception-nonce`, the card's signature, `$reception`.
        Reception,
    }

    #[derive(Debug, clap::Args)]
    pub struct CardsArgs {
        #[arg(long, env = "TSUNAGI_DATA_DIR")]
        pub data_dir: PathBuf,
        #[arg(long, env = "TSUNAGI_DATABASE")]
        pub database: Option<String>,
        /// Persons in the generated data; the cards go to persons spread evenly over them.
        #[arg(long)]
        pub persons: u64,
        /// Cards to issue.
        #[arg(long, default_value_t = 10_000)]
        pub count: u64,
        /// The cards file to write (private keys: benchmark use only).
        #[arg(long)]
        pub out: PathBuf,
    }

    #[derive(Debug, clap::Args)]
    pub struct ImportArgs {
        /// The coverage file.
        pub file: PathBuf,
        /// 保険者番号 of the insurer the file belongs to (every row must carry it).
        #[arg(long)]
        pub insurer: String,
        #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
        pub data_dir: PathBuf,
        #[arg(long, env = "TSUNAGI_DATABASE")]
        pub database: Option<String>,
        /// Default: from the extension (.csv, else NDJSON).
        #[arg(long, value_enum)]
        pub format: Option<Format>,
        /// Continue after the last committed line (FILE.checkpoint).
        #[arg(long)]
        pub resume: bool,
        /// Rows per transaction.
        #[arg(long, default_value_t = 1000)]
        pub batch: usize,
        /// Insurer staff user recorded in the audit trail.
        #[arg(long, env = "USER", default_value = "insurer-batch")]
        pub user: String,
    }

    #[derive(Debug, clap::Args)]
    pub struct GenerateArgs {
        /// Output file (.csv or .ndjson).
        pub out: PathBuf,
        #[arg(long)]
        pub persons: u64,
        /// Insurer index (see `synth::insurer_number`); the 保険者番号 is printed.
        #[arg(long, default_value_t = 1)]
        pub insurer: u32,
        /// First person index.
        #[arg(long, default_value_t = 0)]
        pub first: u64,
    }

    #[derive(Debug, clap::Args)]
    pub struct LoadgenArgs {
        /// Server root, e.g. http://127.0.0.1:8080
        #[arg(long)]
        pub url: String,
        /// Data directory of the server (to mint a clerk token with its key).
        #[arg(long)]
        pub data_dir: PathBuf,
        /// Persons in the generated data (keys are picked at random among them).
        #[arg(long)]
        pub persons: u64,
        #[arg(long, default_value_t = 1)]
        pub insurer: u32,
        #[arg(long, default_value_t = 32)]
        pub concurrency: usize,
        /// Seconds of measured load (after 2 s of warm-up).
        #[arg(long, default_value_t = 20)]
        pub seconds: u64,
        /// Operation path (eligibility mode).
        #[arg(long, default_value = "/fhir/$eligibility")]
        pub path: String,
        #[arg(long, value_enum, default_value = "eligibility")]
        pub mode: LoadMode,
        /// Cards file from `coverage cards` (reception mode).
        #[arg(long, required_if_eq("mode", "reception"))]
        pub cards: Option<PathBuf>,
        /// Facilities the requests are spread over (one reader clerk each).
        #[arg(long, default_value_t = 8)]
        pub facilities: u32,
        /// Eligibility mode: count an answer only when it carries at least this many
        /// subsidies (公費), so a run with subsidies proves they were in every answer.
        #[arg(long, default_value_t = 0)]
        pub expect_subsidies: usize,
    }

    pub fn run_coverage(args: CoverageArgs) -> anyhow::Result<i32> {
        match args.command {
            CoverageCommand::Import(a) => import(a),
            CoverageCommand::Generate(a) => generate(a),
            CoverageCommand::Loadgen(a) => loadgen(a),
            CoverageCommand::Cards(a) => cards(a),
        }
    }

    /// The store of a data directory, or of `--database`.
    fn open(
        data_dir: &std::path::Path,
        database: &Option<String>,
        workload: tsunagi_store::Workload,
    ) -> anyhow::Result<Arc<dyn tsunagi_store::Store>> {
        let cfg = ServerConfig {
            data_dir: data_dir.to_path_buf(),
            database: database.clone(),
            workload,
            ..ServerConfig::default()
        };
        tsunagi_server::open_store(&cfg).map_err(|e| anyhow::anyhow!("opening the database: {e}"))
    }

    fn import(a: ImportArgs) -> anyhow::Result<i32> {
        let store = open(&a.data_dir, &a.database, tsunagi_store::Workload::BulkLoad)?;
        tsunagi_policy::ids::validate_insurer_number(&a.insurer)
            .map_err(|e| anyhow::anyhow!("--insurer: {e}"))?;
        let actor = Principal::new(
            &a.insurer,
            OrgKind::Insurer,
            vec![],
            Role::InsurerStaff,
            Some(a.user.clone()),
            None,
            false,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let format = a.format.unwrap_or_else(|| Format::guess(&a.file));
        let size = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let opts = ImportOptions {
            file: a.file.clone(),
            format,
            resume: a.resume,
            batch: a.batch,
        };
        let stats = import_file(
            &*store,
            &Policy::new(),
            &actor,
            &opts,
            |bytes, ok, failed| {
                bar.set_position(bytes);
                bar.set_message(format!("{ok} imported, {failed} failed"));
            },
        )?;
        bar.finish_and_clear();
        println!(
            "imported {} persons in {:.1}s ({:.0}/s); {} row(s) failed{}",
            stats.imported,
            stats.seconds,
            stats.imported as f64 / stats.seconds.max(1e-9),
            stats.failed,
            if stats.resumed_after > 0 {
                format!(
                    "; resumed after line {} ({} row(s) failed before)",
                    stats.resumed_after, stats.failed_before_resume
                )
            } else {
                String::new()
            }
        );
        if stats.failed_in_file() > 0 {
            println!("error report: {}", errors_path(&a.file).display());
        }
        Ok(if stats.failed_in_file() == 0 { 0 } else { 1 })
    }

    fn generate(a: GenerateArgs) -> anyhow::Result<i32> {
        let insurer = synth::insurer_number(a.insurer);
        let csv = Format::guess(&a.out) == Format::Csv;
        let f = std::fs::File::create(&a.out)
            .with_context(|| format!("creating {}", a.out.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        if csv {
            writeln!(w, "{}", crate::coverage::FIELDS.join(","))?;
        }
        for i in a.first..a.first + a.persons {
            let row = synth::row(i, &insurer);
            if csv {
                let vals: Vec<String> = crate::coverage::FIELDS
                    .iter()
                    .map(|f| match row.get(*f) {
                        Some(serde_json::Value::String(s)) => super::csv_field(s),
                        Some(v) => v.to_string(),
                        None => String::new(),
                    })
                    .collect();
                writeln!(w, "{}", vals.join(","))?;
            } else {
                serde_json::to_writer(&mut w, &row)?;
                w.write_all(b"\n")?;
            }
        }
        w.flush()?;
        println!(
            "{} persons of insurer {insurer} -> {}",
            a.persons,
            a.out.display()
        );
        Ok(0)
    }

    fn cards(a: CardsArgs) -> anyhow::Result<i32> {
        use crate::cards::{CardAuthority, CardKind, issue};
        anyhow::ensure!(
            a.count >= 1 && a.count <= a.persons,
            "--count must be 1..=--persons"
        );
        let store = open(&a.data_dir, &a.database, tsunagi_store::Workload::Online)?;
        let ca = CardAuthority::load_or_create(&a.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        let f = std::fs::File::create(&a.out)
            .with_context(|| format!("creating {}", a.out.display()))?;
        let mut w = BufWriter::new(f);
        let bar = ProgressBar::new(a.count);
        let now = chrono::Utc::now();
        let started = Instant::now();
        for j in 0..a.count {
            let i = j * (a.persons / a.count);
            let person = crate::coverage::person_id(&synth::linkage_id(i));
            let card = issue(
                &*store,
                &ca,
                &person,
                CardKind::Card,
                now - chrono::Duration::days(1),
                now + chrono::Duration::days(5 * 365),
                now,
            )
            .map_err(|e| anyhow::anyhow!("person {i} ({person}): {e}"))?;
            serde_json::to_writer(&mut w, &card)?;
            w.write_all(b"\n")?;
            bar.inc(1);
        }
        w.flush()?;
        bar.finish_and_clear();
        println!(
            "{} cards in {:.1}s -> {}",
            a.count,
            started.elapsed().as_secs_f64(),
            a.out.display()
        );
        Ok(0)
    }

    /// A clerk token of facility `f` (a valid 医療機関等コード, clinic), signed with the
    /// server's key from its data directory.
    fn clerk_token(keys: &tsunagi_policy::ServerKeys, f: u32) -> anyhow::Result<String> {
        let body = format!("131{:06}", 10_000 + f);
        let d: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
        let code = format!("{body}{}", tsunagi_policy::ids::mod10_w21_check_digit(&d));
        let clerk = Principal::new(
            &code,
            OrgKind::Clinic,
            vec![],
            Role::Clerk,
            Some(format!("loadgen-{f}")),
            None,
            false,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        keys.issue(&clerk, chrono::Duration::hours(2))
            .map_err(|e| anyhow::anyhow!("token: {e}"))
    }

    /// POSTs a FHIR JSON body; the answer's text when the status is a success.
    async fn post(
        client: &reqwest::Client,
        url: &str,
        token: &str,
        body: Vec<u8>,
    ) -> Option<String> {
        let resp = client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await
            .ok()?;
        let ok = resp.status().is_success();
        let text = resp.text().await.ok()?;
        ok.then_some(text)
    }

    fn loadgen(a: LoadgenArgs) -> anyhow::Result<i32> {
        let keys = tsunagi_policy::ServerKeys::load_or_create(&a.data_dir)
            .map_err(|e| anyhow::anyhow!("server key: {e}"))?;
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..a.facilities.max(1))
                .map(|f| clerk_token(&keys, f))
                .collect::<anyhow::Result<_>>()?,
        );
        let cards: Arc<Vec<(crate::cards::CardSigner, String)>> = Arc::new(match &a.cards {
            Some(p) if a.mode == LoadMode::Reception => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                text.lines()
                    .map(|l| {
                        let c: crate::cards::CardFile = serde_json::from_str(l)?;
                        let signer = c.signer().map_err(|e| anyhow::anyhow!("{e}"))?;
                        Ok((signer, c.certificate.encode()))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            _ => Vec::new(),
        });
        anyhow::ensure!(
            a.mode == LoadMode::Eligibility || !cards.is_empty(),
            "the cards file holds no card"
        );
        let insurer = synth::insurer_number(a.insurer);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let base = a.url.trim_end_matches('/').to_string();
        rt.block_on(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(a.concurrency)
                .build()?;
            let persons = a.persons.max(1);
            let expect_subsidies = a.expect_subsidies;
            let load = match a.mode {
                LoadMode::Eligibility => {
                    let url = format!("{base}{}", a.path);
                    latency::drive(a.concurrency, a.seconds, move |x| {
                        let (client, url, tokens, insurer) =
                            (client.clone(), url.clone(), tokens.clone(), insurer.clone());
                        async move {
                            let (ins, symbol, number, branch, birth) =
                                synth::keys(x % persons, &insurer);
                            let body = serde_json::json!({"resourceType": "Parameters", "parameter": [
                                {"name": "insurerNumber", "valueString": ins},
                                {"name": "symbol", "valueString": symbol},
                                {"name": "number", "valueString": number},
                                {"name": "branch", "valueString": branch},
                                {"name": "birthDate", "valueDate": birth}
                            ]});
                            let token = &tokens[(x >> 40) as usize % tokens.len()];
                            let t = Instant::now();
                            let text = post(&client, &url, token, body.to_string().into_bytes()).await?;
                            let us = latency::micros(t);
                            (text.contains("\"valueCode\":\"eligible\"")
                                && text.matches("\"name\":\"subsidy\"").count() >= expect_subsidies)
                                .then(|| vec![us])
                        }
                    })
                    .await?
                }
                LoadMode::Reception => {
                    latency::drive(a.concurrency, a.seconds, move |x| {
                        let (client, base, tokens, cards) =
                            (client.clone(), base.clone(), tokens.clone(), cards.clone());
                        async move {
                            let (signer, certificate) = &cards[x as usize % cards.len()];
                            let token = &tokens[(x >> 40) as usize % tokens.len()];
                            let t = Instant::now();
                            let text = post(
                                &client,
                                &format!("{base}/fhir/$reception-nonce"),
                                token,
                                br#"{"resourceType":"Parameters"}"#.to_vec(),
                            )
                            .await?;
                            let nonce_us = latency::micros(t);
                            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                            let nonce = v["parameter"][0]["valueString"].as_str()?.to_string();
                            let body = crate::reception::reception_parameters(
                                certificate,
                                &signer.sign(&nonce),
                                &nonce,
                                "face",
                                [true, true, false],
                                "outpatient",
                            );
                            let t1 = Instant::now();
                            let text = post(
                                &client,
                                &format!("{base}/fhir/$reception"),
                                token,
                                body.to_string().into_bytes(),
                            )
                            .await?;
                            let reception_us = latency::micros(t1);
                            text.contains("\"Coverage\"")
                                .then(|| vec![latency::micros(t), nonce_us, reception_us])
                        }
                    })
                    .await?
                }
            };
            let latency::Load {
                steps: lat,
                errors,
                seconds: elapsed,
            } = load;
            let empty = Vec::new();
            let total = lat.first().unwrap_or(&empty);
            let what = match a.mode {
                LoadMode::Eligibility => "requests",
                LoadMode::Reception => "receptions (nonce + $reception)",
            };
            println!(
                "{} {what} in {elapsed:.1}s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {errors} errors (concurrency {})",
                total.len(),
                total.len() as f64 / elapsed,
                latency::ms(total, 0.50),
                latency::ms(total, 0.99),
                latency::ms(total, 1.0),
                a.concurrency
            );
            if a.mode == LoadMode::Reception
                && let (Some(nonce), Some(reception)) = (lat.get(1), lat.get(2))
            {
                println!(
                    "  $reception p50 {:.2} ms, p99 {:.2} ms; $reception-nonce p50 {:.2} ms, p99 {:.2} ms",
                    latency::ms(reception, 0.50),
                    latency::ms(reception, 0.99),
                    latency::ms(nonce, 0.50),
                    latency::ms(nonce, 0.99)
                );
            }
            anyhow::Ok(())
        })?;
        Ok(0)
    }
}
