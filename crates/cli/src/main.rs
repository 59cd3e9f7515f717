//! `tsunagi`: one binary for the server and the operator's tools.

mod admin;
mod demo;
mod import;
mod options;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

/// The server allocates and frees many small objects per request (JSON values,
/// strings, hash maps); glibc's malloc was 11-17 % of a read's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use options::{DataArgs, ServeArgs};

#[derive(Parser)]
#[command(
    name = "tsunagi",
    version,
    about = "Tsunagi (つなぎ): an open implementation of Japan's National Medical Information Platform"
)]
struct Cli {
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "TSUNAGI_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded database in --data-dir, or PostgreSQL with --database).
    Serve(ServeArgs),
    /// Create the fixed demo dataset if absent (see docs/DEMO.md), write DIR/demo.json, and serve it.
    Demo(ServeArgs),
    /// Bearer tokens (operator tool).
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Register client keys for OAuth2 client credentials (private_key_jwt).
    #[command(subcommand)]
    Client(admin::ClientCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(admin::AuditCommand),
    /// Bulk-load resources from NDJSON (one resource per line) with a progress bar.
    Import(import::ImportArgs),
    /// Validate resources, Bundles or NDJSON against FHIR profiles; exit 0 without errors, 1 with any.
    Validate(tsunagi_validation::cli::ValidateArgs),
    /// Install and list FHIR packages (JP Core, JP-CLINS, ...) in the data directory.
    Packages(tsunagi_validation::cli::PackagesArgs),
    /// Import the official code masters (drug, disease, modifier, JLAC10, J-FAGY).
    Masters(tsunagi_terminology::cli::MastersArgs),
    /// My Number card simulator: issue a card (key pair + certificate), sign a reception nonce.
    Card(tsunagi_eligibility::cli::CardArgs),
    /// Insurers' coverage files (資格情報): bulk import with per-row error report.
    Coverage(tsunagi_eligibility::cli::CoverageArgs),
    /// EHR sharing retention rules: physical, audited deletion of what is due.
    Retention(tsunagi_sharing::cli::RetentionArgs),
    /// Public Medical Hub: programme catalogue, municipalities' recipient files, generator.
    Pmh(tsunagi_pmh::cli::PmhArgs),
    /// Secondary use, primary side: one-way extraction into pseudonymised Parquet, linkage tables.
    Research(tsunagi_research_primary::cli::ResearchArgs),
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_http=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Serve(args) => serve(args, false),
        Command::Demo(args) => serve(args, true),
        Command::Token(c) => admin::token(c),
        Command::Client(c) => admin::client(c),
        Command::Audit(c) => admin::audit(c),
        Command::Import(a) => import::run(a),
        Command::Validate(a) => exit_code(tsunagi_validation::cli::run_validate(a)?),
        Command::Packages(a) => exit_code(tsunagi_validation::cli::run_packages(a)?),
        Command::Masters(a) => exit_code(tsunagi_terminology::cli::run_masters(a)?),
        Command::Card(a) => exit_code(tsunagi_eligibility::cli::run_card(a)?),
        Command::Coverage(a) => exit_code(tsunagi_eligibility::cli::run_coverage(a)?),
        Command::Retention(a) => exit_code(tsunagi_sharing::cli::run_retention(a)?),
        Command::Pmh(a) => exit_code(tsunagi_pmh::cli::run_pmh(a)?),
        Command::Research(a) => exit_code(tsunagi_research_primary::cli::run(a)?),
    }
}

fn exit_code(code: i32) -> anyhow::Result<u8> {
    Ok(u8::try_from(code).unwrap_or(2))
}

fn serve(args: ServeArgs, demo: bool) -> anyhow::Result<u8> {
    let mut config = args.load()?;
    if demo && args.data.data_dir.is_none() && args.data.config.is_none() {
        config.data_dir = "./demo-data".into();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The PostgreSQL client is synchronous and blocks on a runtime of its own: it
    // must be opened, and finally dropped, outside the server's runtime.
    let store = tsunagi_server::open_store(&config)
        .map_err(|e| anyhow::anyhow!("opening the database: {e}"))?;
    let last_owner = store.clone();
    let code = rt.block_on(async move {
        if demo {
            let st = store.clone();
            let dir = config.data_dir.clone();
            let summary = tokio::task::spawn_blocking(move || demo::ensure(&*st, &dir)).await??;
            eprintln!("demo dataset ready: {summary}; listing in {}", config.data_dir.join("demo.json").display());
            let st = store.clone();
            eprintln!("{}", tokio::task::spawn_blocking(move || tsunagi_pmh::demo::seed(st)).await?.map_err(|e| anyhow::anyhow!("pmh demo data: {e}"))?);
        }
        // Installed packages and masters, when present, add full profile checking;
        // without them the built-in R4 structure and the platform's rules apply.
        let dir = config.data_dir.clone();
        let validator = tokio::task::spawn_blocking(move || tsunagi_validation::Validator::load(&dir)).await??;
        tracing::info!(packages = validator.packages().len(), "validator loaded");
        // Opening reads the store: off the runtime (the PostgreSQL client blocks on a runtime of its own).
        let (st, dir) = (store.clone(), config.data_dir.clone());
        let eligibility = tokio::task::spawn_blocking(move || tsunagi_eligibility::EligibilityService::open(st, &dir, Default::default()))
            .await?
            .map_err(|e| anyhow::anyhow!("eligibility service: {e}"))?;
        let sharing = tsunagi_sharing::SharingService::new(Default::default());
        let _retention = sharing.spawn_retention(store.clone());
        let (st, dir) = (store.clone(), config.data_dir.clone());
        let erx = tokio::task::spawn_blocking(move || tsunagi_eprescription::EprescriptionService::open(st, &dir, Default::default()))
            .await?
            .map_err(|e| anyhow::anyhow!("e-prescription service: {e}"))?;
        let (st, el) = (store.clone(), eligibility.shared.clone());
        let pmh = tokio::task::spawn_blocking(move || tsunagi_pmh::PmhService::open(st, Some(el)))
            .await?
            .map_err(|e| anyhow::anyhow!("pmh service: {e}"))?;
        let state = tsunagi_server::Builder::new(config.clone(), store)
            .validator(Arc::new(validator))
            .service(Arc::new(eligibility))
            .service(Arc::new(sharing))
            .service(Arc::new(erx))
            .service(Arc::new(pmh))
            .service(Arc::new(tsunagi_research_primary::OptOutService))
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, backend = state.engine.store.backend(), base_url = %state.engine.base_url, "tsunagi listening");
        eprintln!("tsunagi listening on http://{addr} (FHIR base {})", state.engine.base_url);
        tsunagi_server::serve(state, listener, shutdown_signal()).await?;
        Ok::<u8, anyhow::Error>(0)
    });
    drop(rt);
    drop(last_owner);
    code
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Opens the database for an operator command.
pub fn open(
    data: &DataArgs,
) -> anyhow::Result<(tsunagi_server::ServerConfig, Arc<dyn tsunagi_store::Store>)> {
    data.open()
}
