//! `stowage bench` through its real entry point: a SIGINT sent to the process stops the
//! run and everything created is cleaned up. In its own test binary because it signals
//! the whole process.

#[allow(dead_code)]
#[path = "it/fake.rs"]
mod fake;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fake::{Behavior, FakeServer};
use rustix::process::{getpid, kill_process, Signal};
use stowage_client::bench::{self, BenchArgs};

#[derive(Debug, Parser)]
#[command(name = "stowage")]
enum Cli {
    Bench(BenchArgs),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_bench_and_cleans_up() {
    let s = FakeServer::start(Behavior {
        op_delay: Duration::from_millis(5),
        ..Default::default()
    })
    .await;
    let Cli::Bench(args) = Cli::try_parse_from([
        "stowage",
        "bench",
        "--endpoint",
        &s.endpoint,
        "--count",
        "100000",
        "--concurrency",
        "4",
        "--output",
        "json",
    ])
    .unwrap();
    let interrupt = async {
        // Operations are running, so run() has installed its handlers.
        while s.state().create_volume_calls < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kill_process(getpid(), Signal::INT).unwrap();
    };
    let (code, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(bench::run(args), interrupt)
    })
    .await
    .expect("bench did not stop within 30s of SIGINT");
    assert_eq!(code, ExitCode::from(130));
    let state = s.state();
    assert!(state.is_clean(), "{state:?}");
    assert!(state.create_volume_calls < 100_000);
}
