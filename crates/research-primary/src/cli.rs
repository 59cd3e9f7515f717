//! `tsunagi research ...`: the primary-side operator commands.
//!
//! - `tsunagi research extract --dataset ID --research-dir DIR`: the one-way
//!   extraction (reads the primary database, writes `DIR/datasets/ID/`);
//! - `tsunagi research link --project P --datasets A,B --research-dir DIR`: the
//!   linkage service's join table for an approved project (link first, then
//!   process) at `DIR/linkage/P.parquet`: per person a project link id and the
//!   person's pseudonym in each dataset; opted-out persons are left out.
//!
//! The linkage key file defaults to `<data dir>/linkage/linkage.key` on the
//! primary side; the research side is never given it.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use tsunagi_server::ServerConfig;
use tsunagi_store::Store;

use crate::extract::{self, ExtractConfig, valid_dataset_id};
use crate::linkage::LinkageKey;
use crate::optout::OptOutSnapshot;

#[derive(Debug, clap::Args)]
pub struct ResearchArgs {
    #[command(subcommand)]
    pub command: ResearchCommand,
}

#[derive(Debug, clap::Args)]
pub struct Primary {
    /// Primary data directory (embedded database, linkage key, opt-out snapshots).
    #[arg(long, env = "TSUNAGI_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL; without it the embedded database in the data directory.
    #[arg(long, env = "TSUNAGI_DATABASE")]
    pub database: Option<String>,
    /// The linkage service's key file (created on first use, mode 0600).
    #[arg(long)]
    pub linkage_key: Option<PathBuf>,
    /// The research side's data directory (receives datasets/ and linkage/).
    #[arg(long, env = "TSUNAGI_RESEARCH_DIR")]
    pub research_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum ResearchCommand {
    /// Extracts the clinical records into a new pseudonymised Parquet dataset.
    Extract {
        #[command(flatten)]
        primary: Primary,
        /// Dataset id (new; datasets are never overwritten).
        #[arg(long)]
        dataset: String,
    },
    /// Writes the linkage table of an approved project across datasets.
    Link {
        #[command(flatten)]
        primary: Primary,
        #[arg(long)]
        project: String,
        /// Comma-separated dataset ids.
        #[arg(long, value_delimiter = ',')]
        datasets: Vec<String>,
    },
}

fn open(p: &Primary) -> anyhow::Result<(Arc<dyn Store>, LinkageKey)> {
    let cfg = ServerConfig {
        data_dir: p.data_dir.clone(),
        database: p.database.clone(),
        ..ServerConfig::default()
    };
    let store = tsunagi_server::open_store(&cfg)
        .map_err(|e| anyhow::anyhow!("opening the database: {e}"))?;
    let key_path = p
        .linkage_key
        .clone()
        .unwrap_or_else(|| p.data_dir.join("linkage").join("linkage.key"));
    Ok((store, LinkageKey::load_or_create(&key_path)?))
}

pub fn run(args: ResearchArgs) -> anyhow::Result<i32> {
    match args.command {
        ResearchCommand::Extract { primary, dataset } => {
            let (store, key) = open(&primary)?;
            let cfg = ExtractConfig {
                dataset,
                research_dir: primary.research_dir.clone(),
            };
            let snaps = primary.data_dir.join("research-optout-snapshots");
            let rep = extract::run(&*store, &cfg, &key, Some(&snaps))?;
            for t in &rep.tables {
                println!(
                    "{:<20} {:>10} rows  {:>6} left out (opt-out)  {} .. {}",
                    t.name,
                    t.rows,
                    t.opted_out_skipped,
                    t.from.as_deref().unwrap_or("-"),
                    t.to.as_deref().unwrap_or("-")
                );
            }
            println!(
                "dataset {} written to {} (opt-out snapshot {})",
                rep.dataset,
                rep.dir.display(),
                rep.manifest["optOutSnapshot"]["id"].as_str().unwrap_or("")
            );
            Ok(0)
        }
        ResearchCommand::Link {
            primary,
            project,
            datasets,
        } => {
            if !valid_dataset_id(&project) || datasets.is_empty() {
                anyhow::bail!("--project must be an id and --datasets non-empty");
            }
            let (store, key) = open(&primary)?;
            let n = link(&*store, &key, &project, &datasets, &primary.research_dir)?;
            println!("linkage table of {project}: {n} persons");
            Ok(0)
        }
    }
}

/// Writes `<research_dir>/linkage/<project>.parquet`.
pub fn link(
    store: &dyn Store,
    key: &LinkageKey,
    project: &str,
    datasets: &[String],
    research_dir: &std::path::Path,
) -> anyhow::Result<usize> {
    let optout = OptOutSnapshot::take(store).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut persons = Vec::new();
    extract::each_current(store, "Patient", |s| {
        if !optout.persons.contains(&s.id) {
            persons.push(s.id);
        }
        Ok(())
    })?;
    let mut fields = vec![Field::new("link_id", DataType::Utf8, false)];
    fields.extend(
        datasets
            .iter()
            .map(|d| Field::new(format!("pid_{d}"), DataType::Utf8, false)),
    );
    let schema = Arc::new(Schema::new(fields));
    let mut cols: Vec<Arc<dyn arrow::array::Array>> = vec![Arc::new(
        StringArray::from_iter_values(persons.iter().map(|p| key.link_id(project, p))),
    )];
    for d in datasets {
        cols.push(Arc::new(StringArray::from_iter_values(
            persons.iter().map(|p| key.pseudonym(d, p)),
        )));
    }
    let dir = research_dir.join("linkage");
    std::fs::create_dir_all(&dir)?;
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(dir.join(format!("{project}.parquet")))?,
        schema.clone(),
        None,
    )?;
    w.write(&RecordBatch::try_new(schema, cols)?)?;
    w.close()?;
    store
        .audit_append(&[serde_json::json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "org": crate::optout::SERVICE_ORG, "user": null, "role": "operator", "purpose": "research",
            "action": "research-linkage", "patient": null,
            "resources": datasets.iter().map(|d| format!("dataset/{d}")).collect::<Vec<_>>(),
            "outcome": "success", "status": 200,
            "reason": format!("project {project}; {} persons; opt-out snapshot {}", persons.len(), optout.id),
            "request_id": uuid::Uuid::new_v4().to_string(),
        })])
        .map_err(|e| anyhow::anyhow!("audit: {e}"))?;
    Ok(persons.len())
}
