//! `$reception` under concurrent load: throughput and p50/p99 latency.
//! Ignored by default; run in release:
//!
//! ```sh
//! cargo test --release -p tsunagi-eligibility --test reception_bench -- --ignored --nocapture
//! # RECEPTION_BENCH_N (default 2000), RECEPTION_BENCH_CONCURRENCY (default 16),
//! # TSUNAGI_TEST_PG for the PostgreSQL run
//! ```
//!
//! Each request is a full card reception: the reader's nonce (`$reception-nonce`,
//! timed separately), the card's Ed25519 signature, and `$reception` (certificate
//! check against the store, nonce use, Consent write with audit in one
//! transaction, the Coverage search through the engine with its audit record).

mod access_support;

use std::sync::Arc;
use std::time::Instant;

use access_support::*;
use tsunagi_policy::identity::{OrgKind, Role};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    tsunagi_server::latency::nearest_rank(sorted, p).unwrap_or(0.0)
}

async fn run(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    let n = env("RECEPTION_BENCH_N", 2000);
    let c = env("RECEPTION_BENCH_CONCURRENCY", 16);
    let people = 200;
    let mut cards = Vec::new();
    for i in 0..people {
        let id = format!("b{i:04}");
        s.seed_patient(
            &id,
            "山田",
            &format!("{i}"),
            "1980-02-03",
            "東京都千代田区1-1",
        );
        cards.push(s.card(&id));
    }
    let s = Arc::new(s);
    let cards = Arc::new(cards);
    // one reader (clerk token) per facility; 8 facilities
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..8)
            .map(|f| s.token(&format!("13100000{f:02}"), OrgKind::Clinic, Role::Clerk))
            .collect(),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let (s, cards, tokens) = (s.clone(), cards.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut nonce_lat = Vec::new();
            let mut i = w;
            while i < n {
                let token = &tokens[i % tokens.len()];
                let card = &cards[i % cards.len()];
                let t = Instant::now();
                let nonce = s.nonce(token).await;
                nonce_lat.push(t.elapsed().as_secs_f64() * 1000.0);
                let sig = card.sign(&nonce).unwrap();
                let body = tsunagi_eligibility::reception::reception_parameters(
                    &card.certificate.encode(),
                    &sig,
                    &nonce,
                    "face",
                    [true, true, false],
                    "outpatient",
                );
                let t = Instant::now();
                let r = s.post(token, "/fhir/$reception", &body).await;
                assert_eq!(r.status, 200, "{}", r.text);
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += c;
            }
            (lat, nonce_lat)
        }));
    }
    let mut lat = Vec::new();
    let mut nonce_lat = Vec::new();
    for t in tasks {
        let (a, b) = t.await.unwrap();
        lat.extend(a);
        nonce_lat.extend(b);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    nonce_lat.sort_by(f64::total_cmp);
    eprintln!(
        "reception bench [{b:?}] {n} receptions, concurrency {c}: {:.0} receptions/s (nonce + $reception); $reception p50 {:.1} ms, p99 {:.1} ms; $reception-nonce p50 {:.2} ms, p99 {:.2} ms",
        n as f64 / secs,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&nonce_lat, 0.5),
        pct(&nonce_lat, 0.99),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
async fn reception_throughput_sqlite() {
    run(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
async fn reception_throughput_postgres() {
    run(Backend::Postgres).await
}
