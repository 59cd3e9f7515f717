//! `tsunagi validate` and `tsunagi packages`: clap arguments and run functions.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::{Validator, has_errors, install_package};

/// `tsunagi validate FILE... [--profile URL] [--packages DIR]`
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// JSON resources, Bundles, or NDJSON files (one resource per line; `.ndjson`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Validate against this profile (canonical URL) instead of meta.profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// FHIR packages to load: a folder of .tgz files / unpacked packages, or one package.
    #[arg(long)]
    pub packages: Vec<PathBuf>,
    /// Data directory with installed packages and imported masters.
    #[arg(long, env = "TSUNAGI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print only the number of resources and issues for NDJSON input.
    #[arg(long)]
    pub summary: bool,
}

/// Runs `tsunagi validate`; prints OperationOutcome JSON (one per input
/// resource; NDJSON input prints one OperationOutcome per line that has issues).
/// Returns the exit code: 0 no errors, 1 any error.
pub fn run_validate(args: ValidateArgs) -> anyhow::Result<i32> {
    let validator = match (&args.data_dir, args.packages.is_empty()) {
        (Some(d), true) => Validator::load(d)?,
        (d, _) => {
            let term = match d {
                Some(d) => Some(tsunagi_terminology::Terminology::open(d)?),
                None => None,
            };
            let mut paths = args.packages.clone();
            if let Some(d) = d
                && crate::packages_dir(d).is_dir()
            {
                paths.push(crate::packages_dir(d));
            }
            Validator::from_paths(&paths, term)?
        }
    };
    let mut any_error = false;
    let profile = args.profile.as_deref();
    for file in &args.files {
        let ndjson = file
            .extension()
            .is_some_and(|e| e == "ndjson" || e == "jsonl");
        if !ndjson {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let issues = match serde_json::from_str::<Value>(&text) {
                Ok(v) => validator.validate(&v, profile),
                Err(e) => vec![tsunagi_fhir::Issue::error(
                    "structure",
                    None,
                    format!("{}: not valid JSON: {e}", file.display()),
                )],
            };
            any_error |= has_errors(&issues);
            let mut oo = tsunagi_fhir::operation_outcome(&issues);
            oo["id"] = json!(
                file.display()
                    .to_string()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                    .chars()
                    .take(64)
                    .collect::<String>()
            );
            println!("{}", serde_json::to_string_pretty(&oo)?);
            continue;
        }
        let size = std::fs::metadata(file)?.len();
        let pb = indicatif::ProgressBar::new(size);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {bytes}/{total_bytes} ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message(file.display().to_string());
        let reader = BufReader::new(std::fs::File::open(file)?);
        let (mut n, mut nerr, mut nissues) = (0u64, 0u64, 0u64);
        for (i, line) in reader.lines().enumerate() {
            let line = line?;
            pb.inc(line.len() as u64 + 1);
            if line.trim().is_empty() {
                continue;
            }
            n += 1;
            let issues = match serde_json::from_str::<Value>(&line) {
                Ok(v) => validator.validate(&v, profile),
                Err(e) => vec![tsunagi_fhir::Issue::error(
                    "structure",
                    None,
                    format!("line {}: not valid JSON: {e}", i + 1),
                )],
            };
            if has_errors(&issues) {
                nerr += 1;
                any_error = true;
            }
            nissues += issues.len() as u64;
            if !issues.is_empty() && !args.summary {
                let mut oo = tsunagi_fhir::operation_outcome(&issues);
                oo["id"] = json!(format!("line-{}", i + 1));
                pb.suspend(|| println!("{}", serde_json::to_string(&oo).unwrap_or_default()));
            }
        }
        pb.finish_and_clear();
        eprintln!(
            "{}: {n} resources, {nerr} with errors, {nissues} issues",
            file.display()
        );
    }
    Ok(if any_error { 1 } else { 0 })
}

/// `tsunagi packages install FILE|DIR --data-dir DIR` / `tsunagi packages list`
#[derive(Debug, Args)]
pub struct PackagesArgs {
    #[command(subcommand)]
    pub command: PackagesCommand,
}

#[derive(Debug, Subcommand)]
pub enum PackagesCommand {
    /// Install a FHIR package (.tgz or unpacked folder) into DATA_DIR/packages/.
    Install {
        path: PathBuf,
        #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
    /// List the installed packages.
    List {
        #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
}

pub fn run_packages(args: PackagesArgs) -> anyhow::Result<i32> {
    match args.command {
        PackagesCommand::Install { path, data_dir } => {
            let info = install_package(&path, &data_dir)?;
            if info.without_snapshot > 0 {
                eprintln!(
                    "warning: {} StructureDefinition(s) in {} have no snapshot and cannot be used for validation; install the snapshot build of the package (\"-snap\" / snapshot版)",
                    info.without_snapshot,
                    path.display()
                );
            }
            println!(
                "installed {} {} ({} conformance resources) into {}",
                info.name,
                info.version,
                info.resources,
                crate::packages_dir(&data_dir).display()
            );
            Ok(0)
        }
        PackagesCommand::List { data_dir } => {
            let v = Validator::load(&data_dir)?;
            for p in v.packages() {
                println!(
                    "{}\t{}\t{} resources\t{}",
                    p.name,
                    p.version,
                    p.resources,
                    p.source.display()
                );
            }
            for n in v.load_notes() {
                eprintln!("note: {n}");
            }
            let c = v.constraint_coverage();
            println!(
                "invariants: {} in the loaded profiles, {} native, {} by FHIRPath, {} not evaluable (reported as warnings)",
                c.total,
                c.native,
                c.total - c.native - c.unsupported.len(),
                c.unsupported.len()
            );
            for (url, key, why) in &c.unsupported {
                println!("  not evaluable: {url} {key}: {why}");
            }
            Ok(0)
        }
    }
}
