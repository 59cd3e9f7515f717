//! (to be written)

/// `tsunagi card ...`
#[derive(Debug, clap::Args)]
pub struct CardArgs {
    #[command(subcommand)]
    pub command: CardCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CardCommand {}

pub fn run_card(args: CardArgs) -> anyhow::Result<i32> {
    match args.command {}
}
