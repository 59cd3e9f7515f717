//! `tsunagi masters ...`: clap arguments and the run function the binary wires in.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::{MasterKind, Terminology, import_with_progress};

/// `tsunagi masters`: import and inspect the terminology masters.
#[derive(Debug, Args)]
pub struct MastersArgs {
    #[command(subcommand)]
    pub command: MastersCommand,
}

#[derive(Debug, Subcommand)]
pub enum MastersCommand {
    /// Import a published master file (Shift_JIS or UTF-8 CSV; JLAC10 also as the IG's CodeSystem JSON).
    Import {
        /// The master file (e.g. y_ALL20240321.csv, b_20240601.txt, z_20250601.txt, JFAGY_*.csv, MEDIS20260930.TXT for the HOT code master).
        file: PathBuf,
        /// Which master the file is.
        #[arg(long, value_enum)]
        kind: MasterKind,
        /// Data directory (masters are stored under DATA_DIR/terminology/).
        #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
    /// Look a code up: prints the $lookup Parameters.
    Lookup {
        system: String,
        code: String,
        #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
}

/// Runs `tsunagi masters ...`; returns the process exit code
/// (0 ok, 1 some rows rejected or code not found).
pub fn run_masters(args: MastersArgs) -> anyhow::Result<i32> {
    match args.command {
        MastersCommand::Import {
            file,
            kind,
            data_dir,
        } => {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:40}] {pos}/{len} lines",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_message(format!("importing {}", file.display()));
            let report = import_with_progress(&file, kind, &data_dir, &|done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            })?;
            pb.finish_and_clear();
            for e in &report.errors {
                eprintln!("{}:{}: {}", file.display(), e.line, e.message);
            }
            println!(
                "imported {} {:?} rows from {} ({}), {} bad line(s) skipped",
                report.imported,
                kind,
                file.display(),
                report.encoding,
                report.errors.len()
            );
            Ok(if report.errors.is_empty() { 0 } else { 1 })
        }
        MastersCommand::Lookup {
            system,
            code,
            data_dir,
        } => {
            let t = Terminology::open(&data_dir)?;
            match t.lookup(&system, &code) {
                Some(r) => {
                    println!("{}", serde_json::to_string_pretty(&r.to_parameters())?);
                    Ok(0)
                }
                None => {
                    eprintln!(
                        "{system}|{code}: not found (loaded masters: {:?})",
                        t.loaded()
                    );
                    Ok(1)
                }
            }
        }
    }
}
