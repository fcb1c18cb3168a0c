//! Integration tests of `stowage ctl`, `stowage bench` and `stowage bench floor` against an
//! in-process fake CSI driver (see `fake.rs`). One test binary, several modules, to keep
//! link time down.

mod bench;
mod ctl;
mod fake;
mod floor;
mod logcapture;
mod scale;

use std::future::Future;
use std::time::Duration;

use clap::Parser;
use stowage_client::bench::BenchArgs;
use stowage_client::ctl::CtlArgs;

/// The command line as the `stowage` binary embeds the two subcommands.
#[derive(Debug, Parser)]
#[command(name = "stowage")]
pub enum Cli {
    Ctl(CtlArgs),
    Bench(BenchArgs),
}

pub fn parse_ctl(argv: &[&str]) -> CtlArgs {
    let full: Vec<&str> = ["stowage", "ctl"].iter().chain(argv).copied().collect();
    match Cli::try_parse_from(&full) {
        Ok(Cli::Ctl(a)) => a,
        other => panic!("cannot parse {full:?}: {other:?}"),
    }
}

pub fn parse_bench(argv: &[&str]) -> BenchArgs {
    let full: Vec<&str> = ["stowage", "bench"].iter().chain(argv).copied().collect();
    match Cli::try_parse_from(&full) {
        Ok(Cli::Bench(a)) => a,
        other => panic!("cannot parse {full:?}: {other:?}"),
    }
}

/// Every test body is bounded so a hang fails instead of blocking CI.
pub async fn bounded<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

pub const LIMIT: Duration = Duration::from_secs(30);
