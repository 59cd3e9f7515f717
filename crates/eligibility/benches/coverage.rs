//! Coverage and `$eligibility` benchmark driver (not a timed test).
//!
//! ```sh
//! B="cargo bench -p tsunagi-eligibility --bench coverage --"
//! $B coverage generate /tmp/cov.ndjson --persons 1000000          # synthetic members
//! $B coverage import /tmp/cov.ndjson --insurer 06130017 --data-dir /tmp/d   # import rate
//! $B serve --data-dir /tmp/d --listen 127.0.0.1:8089 &             # the server, one process
//! $B coverage loadgen --url http://127.0.0.1:8089 --data-dir /tmp/d --persons 1000000 --concurrency 32
//! $B coverage cards --data-dir /tmp/d --persons 1000000 --count 10000 --out /tmp/cards.ndjson
//! $B coverage loadgen --url http://127.0.0.1:8089 --data-dir /tmp/d --persons 1000000 \
//!     --mode reception --cards /tmp/cards.ndjson --concurrency 16
//! ```
//!
//! `serve` runs the platform server with the eligibility service (embedded SQLite in
//! DATA_DIR, or `--database postgres://...`); `coverage ...` is the same command as
//! `tsunagi coverage ...`. The load generator is a separate process on loopback.

/// The allocator of the `tsunagi` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tsunagi_eligibility::bulk::cli::{CoverageArgs, run_coverage};
use tsunagi_eligibility::{Config, EligibilityService};
use tsunagi_server::ServerConfig;

#[derive(Parser)]
enum Cli {
    /// Serves the platform with the eligibility service.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: SocketAddr,
        #[arg(long)]
        database: Option<String>,
        /// Worker threads of the server's runtime.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// `tsunagi coverage ...` (import, generate, loadgen).
    Coverage(CoverageArgs),
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; drop it.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() < 2 {
        println!("usage: coverage serve|coverage ... (see the file's docs)");
        return Ok(());
    }
    match Cli::parse_from(args) {
        Cli::Coverage(c) => {
            let code = run_coverage(c)?;
            std::process::exit(code);
        }
        Cli::Serve {
            data_dir,
            listen,
            database,
            threads,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?;
            let config = ServerConfig {
                data_dir: data_dir.clone(),
                listen,
                database,
                base_url: Some(format!("http://{listen}/fhir")),
                ..ServerConfig::default()
            };
            // opened outside the runtime: the synchronous PostgreSQL client blocks
            let store = tsunagi_server::open_store(&config)
                .map_err(|e| anyhow::anyhow!("open store: {e}"))?;
            // as `tsunagi serve`: the card authority of the data directory, the live
            // consents, disaster declarations and facility settings from the store
            let service = EligibilityService::open(store.clone(), &data_dir, Config::default())
                .map_err(|e| anyhow::anyhow!("eligibility service: {e}"))?;
            rt.block_on(async move {
                let state = tsunagi_server::Builder::new(config, store)
                    .service(Arc::new(service))
                    .build()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let listener = tokio::net::TcpListener::bind(listen).await?;
                println!("serving on http://{listen}");
                tsunagi_server::serve(state, listener, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                anyhow::Ok(())
            })
        }
    }
}
