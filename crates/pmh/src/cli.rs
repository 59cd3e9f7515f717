//! `tsunagi pmh ...`: the catalogue, recipient files, and the benchmark generator.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use chrono::NaiveDate;
use serde_json::Value;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_policy::ids::mod10_w21_check_digit;
use tsunagi_policy::policy::Policy;
use tsunagi_server::engine::WriteWork;
use tsunagi_server::{BasicValidator, Ctx, ServerConfig};
use tsunagi_store::{Store, Workload};

use crate::catalogue::{self, Catalogue};
use crate::recipients::{self, Options};

#[derive(Debug, clap::Args)]
pub struct PmhArgs {
    #[command(subcommand)]
    pub command: PmhCommand,
}

#[derive(Debug, clap::Args)]
pub struct Db {
    #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    #[arg(long, env = "TSUNAGI_DATABASE")]
    pub database: Option<String>,
}

impl Db {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        self.open_for(Workload::Online)
    }

    fn open_for(&self, workload: Workload) -> anyhow::Result<Arc<dyn Store>> {
        let cfg = ServerConfig {
            data_dir: self.data_dir.clone(),
            database: self.database.clone(),
            workload,
            ..ServerConfig::default()
        };
        tsunagi_server::open_store(&cfg).map_err(|e| anyhow!("opening the database: {e}"))
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum PmhCommand {
    /// Imports a programme catalogue (JSON array) as the operator.
    Programmes {
        file: PathBuf,
        #[command(flatten)]
        db: Db,
    },
    /// Imports a municipality's recipient file (CSV with header, or NDJSON);
    /// resumable; writes FILE.errors.csv and FILE.checkpoint. Exit 1 when any row failed.
    Import {
        file: PathBuf,
        /// 地方公共団体コード of the municipality the file comes from.
        #[arg(long)]
        municipality: String,
        /// full (the programme's whole set; missing recipients end) or incremental.
        #[arg(long, default_value = "incremental")]
        mode: String,
        /// Programme of a full file.
        #[arg(long)]
        programme: Option<String>,
        /// Day a full file describes (default today).
        #[arg(long)]
        as_of: Option<NaiveDate>,
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, env = "USER", default_value = "municipality-batch")]
        user: String,
        #[command(flatten)]
        db: Db,
    },
    /// Writes a synthetic recipient CSV: `programmes` rows for each of `persons`
    /// synthetic persons of `tsunagi coverage generate` (same names and birth dates).
    Generate {
        out: PathBuf,
        #[arg(long)]
        persons: u64,
        /// Programmes per person, from 54, 52, 21, 15, 16, 10, 23 and the demo municipality's 80, 81, 88.
        #[arg(long, default_value_t = 10)]
        programmes: usize,
        #[arg(long, default_value_t = 0)]
        first: u64,
    },
}

/// A valid 8-digit 公費負担者番号 for a law number (Tokyo, body `k`).
pub fn payer_number(law: &str, k: u32) -> String {
    let body = format!("{law}13{:03}", k % 1000);
    let d: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    format!("{body}{}", mod10_w21_check_digit(&d))
}

/// A valid 7-digit 受給者番号 for person `i`.
pub fn recipient_number(i: u64) -> String {
    let body = format!("{:06}", i % 1_000_000);
    let d: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    format!("{body}{}", mod10_w21_check_digit(&d))
}

pub const GEN_PROGRAMMES: &[(&str, &str)] = &[
    ("54", "54"),
    ("52", "52"),
    ("21", "21"),
    ("15", "15"),
    ("16", "16"),
    ("10", "10"),
    ("23", "23"),
    ("131016-80", "80"),
    ("131016-81", "81"),
    ("131016-88", "88"),
];

pub fn run_pmh(args: PmhArgs) -> anyhow::Result<i32> {
    match args.command {
        PmhCommand::Programmes { file, db } => {
            let store = db.open()?;
            let doc: Value = serde_json::from_slice(&std::fs::read(&file)?)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let ps = catalogue::parse(&doc).map_err(|e| anyhow!("{e}"))?;
            let op = Principal::new(
                "operator",
                OrgKind::Operator,
                vec![],
                Role::Operator,
                Some("cli".into()),
                None,
                false,
            )
            .map_err(|e| anyhow!("{e}"))?;
            catalogue::save(&*store, &ps, Some(&Ctx::new(op, None))).map_err(|e| anyhow!("{e}"))?;
            println!("imported {} programme(s)", ps.len());
            Ok(0)
        }
        PmhCommand::Import {
            file,
            municipality,
            mode,
            programme,
            as_of,
            resume,
            batch,
            user,
            db,
        } => {
            tsunagi_policy::ids::validate_local_government_code(&municipality)
                .map_err(|e| anyhow!("--municipality: {e}"))?;
            let store = db.open_for(Workload::BulkLoad)?;
            let cat = Catalogue::default();
            cat.load(&*store).map_err(|e| anyhow!("{e}"))?;
            cat.replace(cat.missing_builtin());
            let actor = Principal::new(
                &municipality,
                OrgKind::Municipality,
                vec![],
                Role::MunicipalityStaff,
                Some(user),
                None,
                false,
            )
            .map_err(|e| anyhow!("{e}"))?;
            let shared = Arc::new(crate::Shared::offline(store.clone()));
            let policy = Policy::new().with_rule(Arc::new(crate::access::PmhRule(shared)));
            let work = WriteWork {
                store: store.clone(),
                policy: Arc::new(policy),
                validator: Arc::new(BasicValidator),
                ctx: Ctx::new(actor, Some(Purpose::Operations)),
            };
            let full = match mode.as_str() {
                "full" => true,
                "incremental" => false,
                o => return Err(anyhow!("--mode is full or incremental, not {o}")),
            };
            if full && programme.is_none() {
                return Err(anyhow!("a full file needs --programme"));
            }
            let opts = Options {
                full,
                programme,
                as_of: as_of
                    .unwrap_or_else(|| tsunagi_eligibility::cards::jst_date(chrono::Utc::now())),
                batch: batch.max(1),
            };
            let started = Instant::now();
            let report = recipients::import_file(work, &cat, &file, opts, resume)?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} rows in {secs:.1}s ({:.0} rows/s): {} written, {} unchanged, {} ended, {} ended (missing from full file), {} to review, {} failed, {} skipped (resume)",
                report.rows,
                report.rows as f64 / secs.max(1e-9),
                report.written,
                report.unchanged,
                report.ended,
                report.ended_missing,
                report.review,
                report.errors.len(),
                report.skipped
            );
            Ok(if report.errors.is_empty() { 0 } else { 1 })
        }
        PmhCommand::Generate {
            out,
            persons,
            programmes,
            first,
        } => {
            let mut w = BufWriter::new(std::fs::File::create(&out)?);
            writeln!(
                w,
                "payerNumber,recipientNumber,programme,familyName,givenName,familyKana,givenKana,birthDate,sex,address,start,monthlyCeiling,incomeCategory"
            )?;
            let ps = &GEN_PROGRAMMES[..programmes.clamp(1, GEN_PROGRAMMES.len())];
            for i in first..first + persons {
                let r = tsunagi_eligibility::bulk::synth::row(i, "06130017");
                let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                for (code, law) in ps {
                    writeln!(
                        w,
                        "{},{},{code},{},{},{},{},{},{},{},2026-04-01,{},{}",
                        payer_number(law, (i / 1_000_000) as u32),
                        recipient_number(i),
                        s("familyName"),
                        s("givenName"),
                        s("familyNameKana"),
                        s("givenNameKana"),
                        s("birthDate"),
                        s("gender"),
                        s("address"),
                        [2500, 5000, 10000, 20000][(i % 4) as usize],
                        ["I", "II", "III", "IV"][(i % 4) as usize],
                    )?;
                }
            }
            w.flush()?;
            println!(
                "wrote {} rows to {}",
                persons * ps.len() as u64,
                out.display()
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_numbers_are_valid() {
        for law in ["54", "52", "88"] {
            tsunagi_policy::ids::validate_public_payer_number(&payer_number(law, 7)).unwrap();
        }
        for i in [0, 1, 99_999, 123_456] {
            tsunagi_policy::ids::validate_recipient_number(&recipient_number(i)).unwrap();
        }
    }
}
