//! `tsunagi-research`: the research side of secondary use, as its own process.
//!
//! It is given only the research data directory (extracts, workspaces, its own
//! accounts and audit trail); it has no primary database settings and never reads
//! the linkage key.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tsunagi_research::accounts::Role;
use tsunagi_research::{Research, router};

#[derive(Parser)]
#[command(
    name = "tsunagi-research",
    about = "Secondary use: catalogue, review, Visiting analysis environment"
)]
struct Cli {
    /// Research data directory (datasets/, workspaces/, accounts, audit trail).
    #[arg(long, env = "TSUNAGI_RESEARCH_DIR", default_value = "research-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves the research API.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
    },
    /// Adds an account and prints its bearer token once.
    AccountAdd {
        #[arg(long)]
        user: String,
        #[arg(long)]
        org: String,
        /// researcher, reviewer, checker or operator
        #[arg(long)]
        role: Role,
    },
    /// Verifies the hash chain of the research audit trail.
    AuditVerify,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { listen } => {
            let r = Research::open(&cli.data_dir)?;
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            tracing::info!(addr = %listener.local_addr()?, dir = %cli.data_dir.display(), "tsunagi-research listening");
            eprintln!(
                "tsunagi-research listening on http://{}",
                listener.local_addr()?
            );
            axum::serve(listener, router(r)).await?;
        }
        Cmd::AccountAdd { user, org, role } => {
            std::fs::create_dir_all(&cli.data_dir)?;
            let a = tsunagi_research::accounts::Accounts::open(&cli.data_dir)?;
            println!("{}", a.add(&user, &org, role)?);
        }
        Cmd::AuditVerify => {
            let (seq, head) = tsunagi_research::audit::verify(&cli.data_dir.join("audit.jsonl"))?;
            println!("ok: {seq} records, head {head}");
        }
    }
    Ok(())
}
