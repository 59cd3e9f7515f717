//! `tsunagi-bench`: synthetic data generator and the platform-core benchmark.

mod platform;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tsunagi_bench::synth::Synth;

#[derive(Parser)]
#[command(name = "tsunagi-bench", about = "Tsunagi benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write deterministic synthetic data: NDJSON (one resource a line) or transaction Bundles (one a line).
    Gen(GenArgs),
    /// Platform core: spawn `tsunagi serve`, ingest, read and search; print figures.
    Platform(platform::PlatformArgs),
}

#[derive(clap::Args)]
struct GenArgs {
    /// Number of patients (about 20 resources each).
    #[arg(long)]
    patients: u64,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hospitals the patients are spread over.
    #[arg(long, default_value_t = 4)]
    hospitals: usize,
    /// First patient number.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Emit one transaction Bundle per patient per line instead of one resource per line.
    #[arg(long)]
    bundles: bool,
    /// Also write the hospitals' Organization resources to this NDJSON file.
    #[arg(long)]
    organizations: Option<PathBuf>,
}

fn gen_cmd(a: GenArgs) -> anyhow::Result<()> {
    let s = Synth::new(a.seed, a.hospitals);
    let mut w = BufWriter::new(File::create(&a.out)?);
    let mut count = 0u64;
    for n in a.first..a.first + a.patients {
        if a.bundles {
            serde_json::to_writer(&mut w, &s.transaction(n))?;
            w.write_all(b"\n")?;
            count += 1;
        } else {
            for r in s.patient(n) {
                serde_json::to_writer(&mut w, &r)?;
                w.write_all(b"\n")?;
                count += 1;
            }
        }
    }
    w.flush()?;
    if let Some(path) = a.organizations {
        let mut w = BufWriter::new(File::create(path)?);
        for i in 0..s.hospitals {
            serde_json::to_writer(
                &mut w,
                &tsunagi_bench::synth::hospital_organization(&tsunagi_bench::synth::hospital(i)),
            )?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    eprintln!(
        "wrote {count} {} to {}",
        if a.bundles { "bundles" } else { "resources" },
        a.out.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Gen(a) => gen_cmd(a),
        Command::Platform(a) => platform::run(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
