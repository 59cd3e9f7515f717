//! (to be written)

use axum::Router;
use tsunagi_server::{AppState, OperationDecl};

pub fn routes() -> Router<AppState> {
    Router::new()
}

#[allow(dead_code)]
pub fn operations() -> Vec<OperationDecl> {
    Vec::new()
}

pub mod cli {
    /// `tsunagi coverage ...`
    #[derive(Debug, clap::Args)]
    pub struct CoverageArgs {
        #[command(subcommand)]
        pub command: CoverageCommand,
    }

    #[derive(Debug, clap::Subcommand)]
    pub enum CoverageCommand {}

    pub fn run_coverage(args: CoverageArgs) -> anyhow::Result<i32> {
        match args.command {}
    }
}
