//! `tsunagi retention run`: the retention job on demand (the same job `serve`
//! schedules).

use std::path::PathBuf;

use tsunagi_server::ServerConfig;

/// `tsunagi retention ...`
#[derive(Debug, clap::Args)]
pub struct RetentionArgs {
    #[command(subcommand)]
    pub command: RetentionCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum RetentionCommand {
    /// Deletes (physically, audited) what the retention rules say is due now.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    #[arg(long, env = "TSUNAGI_DATABASE")]
    pub database: Option<String>,
    /// Evaluate the rules as of this instant (RFC 3339) instead of now.
    #[arg(long)]
    pub at: Option<String>,
    /// Days a received referral letter is kept after its receipt.
    #[arg(long, default_value_t = 7)]
    pub referral_after_receipt_days: i64,
    /// List what is due without deleting it (and without recording the run).
    #[arg(long)]
    pub dry_run: bool,
    /// Read every entry instead of only what may have become due since the
    /// last run (once after upgrading from a version without registration-hour
    /// tags, or to check the incremental runs).
    #[arg(long)]
    pub full: bool,
}

pub fn run_retention(args: RetentionArgs) -> anyhow::Result<i32> {
    match args.command {
        RetentionCommand::Run(a) => run(a),
    }
}

fn run(a: RunArgs) -> anyhow::Result<i32> {
    let cfg = ServerConfig {
        data_dir: a.data_dir.clone(),
        database: a.database.clone(),
        ..ServerConfig::default()
    };
    let store = tsunagi_server::open_store(&cfg)
        .map_err(|e| anyhow::anyhow!("opening the database: {e}"))?;
    let now = match &a.at {
        Some(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|e| anyhow::anyhow!("--at: {e}"))?
            .with_timezone(&chrono::Utc),
        None => chrono::Utc::now(),
    };
    let rules = crate::retention::Rules {
        referral_after_receipt_days: a.referral_after_receipt_days,
        ..Default::default()
    };
    let mode = if a.full {
        crate::retention::Mode::Full
    } else {
        crate::retention::Mode::Auto
    };
    let started = std::time::Instant::now();
    let report = crate::retention::run_with(&*store, &rules, now, mode, a.dry_run)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for id in &report.ids {
        println!("{id}");
    }
    eprintln!(
        "retention ({} run{}): {} of {} entries examined {} in {:.1} s",
        report.mode,
        if a.dry_run { ", dry run" } else { "" },
        report.purged,
        report.examined,
        if a.dry_run { "are due" } else { "deleted" },
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}
