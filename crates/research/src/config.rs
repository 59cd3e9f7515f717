//! Configuration of the research side: the public-interest categories, the
//! screening terms, disclosure thresholds and the fee schedule.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub code: String,
    pub label: String,
}

/// Fee schedule (yen). The fee of an application is itemised from these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeeSchedule {
    /// 基本料金: per application.
    pub basic: u64,
    /// 調整料金: per dataset to coordinate.
    pub coordination_per_dataset: u64,
    /// データ料金: per table, plus per started million rows.
    pub data_per_table: u64,
    pub data_per_million_rows: u64,
    /// クラウド利用料金: per month of workspace.
    pub cloud_per_month: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Public-interest purpose categories an application must name one of.
    pub categories: Vec<Category>,
    /// Words that mark an advertising or marketing purpose (rejected on submission).
    pub marketing_terms: Vec<String>,
    /// Cells with counts below this are suppressed (統計的開示制御).
    pub min_cell_count: u64,
    /// k required for anonymised workspaces over (sex, birth year-month).
    pub k_anonymity: usize,
    pub fees: FeeSchedule,
}

impl Default for Config {
    fn default() -> Self {
        let cat = |c: &str, l: &str| Category {
            code: c.into(),
            label: l.into(),
        };
        Config {
            categories: vec![
                cat("public-health", "公衆衛生の向上"),
                cat("policy", "政策の立案・評価"),
                cat("statistics", "統計の作成"),
                cat("education", "教育"),
                cat("patient-benefit", "患者の利益となる研究"),
                cat("medical-ai-devices", "医療AI・医療機器の開発・評価"),
            ],
            marketing_terms: [
                "広告",
                "宣伝",
                "マーケティング",
                "販売促進",
                "販促",
                "advertis",
                "marketing",
                "promotion",
            ]
            .map(String::from)
            .to_vec(),
            min_cell_count: 10,
            k_anonymity: 5,
            fees: FeeSchedule {
                basic: 100_000,
                coordination_per_dataset: 50_000,
                data_per_table: 20_000,
                data_per_million_rows: 10_000,
                cloud_per_month: 80_000,
            },
        }
    }
}

impl Config {
    /// `<data dir>/research.json` when present, else the defaults.
    pub fn load(data_dir: &Path) -> anyhow::Result<Config> {
        let p = data_dir.join("research.json");
        if p.exists() {
            Ok(serde_json::from_slice(&std::fs::read(&p)?)?)
        } else {
            Ok(Config::default())
        }
    }
}
