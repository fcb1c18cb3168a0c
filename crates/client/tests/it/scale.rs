//! `stowage bench scale` against the fake driver: every step is measured, everything the
//! run created is deleted afterwards (also when interrupted), `--keep` leaves it.

use std::time::Duration;

use serde_json::Value;
use stowage_client::bench::CancelToken;

use crate::bench::{bench, bench_with, wait_for, Run};
use crate::fake::{Behavior, FakeServer};
use crate::{bounded, LIMIT};

fn steps(report: &Value) -> &Vec<Value> {
    report["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in {report:#}"))
}

#[track_caller]
fn assert_ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.out, r.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_measures_each_step_and_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        // Not ours: listed (so entries may exceed the step), never deleted.
        s.add_volume("vol-foreign", 1 << 20);
        let pid = std::process::id().to_string();
        let r = bench(
            &s,
            &[
                "scale",
                "--endpoint",
                &s.endpoint,
                "--steps",
                "50,20",
                "--probe-count",
                "5",
                "--concurrency",
                "4",
                "--pid",
                &pid,
                "-o",
                "json",
            ],
        )
        .await;
        assert_ok(&r);
        let j = r.json();
        assert_eq!(j["workload"], "scale");
        assert_eq!(j["interrupted"], false);
        assert_eq!(j["failed_operations"], 0);
        assert_eq!(j["volumes_created"], 50);
        let rows = steps(&j);
        assert_eq!(rows.len(), 2, "{j:#}");
        let prefix = j["name_prefix"].as_str().unwrap().to_owned();
        assert!(prefix.starts_with("bench-scale-"), "{prefix}");
        // Steps run in increasing order whatever order they were given in.
        for (row, n) in rows.iter().zip([20u64, 50]) {
            assert_eq!(row["volumes"], n);
            assert_eq!(row["create"]["ok"], 5, "{row:#}");
            assert_eq!(row["delete"]["ok"], 5, "{row:#}");
            assert!(row["creates_per_second"].as_f64().unwrap() > 0.0);
            let list = &row["list"];
            assert!(list["entries"].as_u64().unwrap() > n, "{row:#}");
            assert_eq!(list["pages"], 1, "no max_entries: one page");
            assert_eq!(list["run_seconds"].as_array().unwrap().len(), 5);
            assert!(list["min_seconds"].as_f64() <= list["median_seconds"].as_f64());
            // The fake runs in this process, so its RSS is ours.
            assert!(row["rss_bytes"].as_u64().unwrap() > 0);
        }
        assert_eq!(rows[0]["populated"], 20);
        assert_eq!(rows[1]["populated"], 30);
        assert_eq!(j["cleanup"]["complete"], true, "{j:#}");
        assert_eq!(j["cleanup"]["deleted"], 50);
        let state = s.state();
        assert_eq!(
            state.volumes.keys().collect::<Vec<_>>(),
            ["vol-foreign"],
            "only the foreign volume may be left"
        );
        // 50 volumes plus 5 probes per step, each name created once.
        assert_eq!(state.create_volume_calls, 60);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_follows_pagination() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &[
                "scale",
                "--endpoint",
                &s.endpoint,
                "--steps",
                "10,25",
                "--probe-count",
                "2",
                "--page-size",
                "10",
                "-o",
                "json",
            ],
        )
        .await;
        assert_ok(&r);
        let j = r.json();
        let rows = steps(&j);
        assert_eq!(rows[0]["list"]["entries"], 10);
        assert_eq!(rows[0]["list"]["pages"], 1);
        assert_eq!(rows[1]["list"]["entries"], 25);
        assert_eq!(rows[1]["list"]["pages"], 3);
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_table_report() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &[
                "scale",
                "--endpoint",
                &s.endpoint,
                "--steps",
                "3,6",
                "--probe-count",
                "2",
                "--page-size",
                "2",
            ],
        )
        .await;
        assert_ok(&r);
        let header = "VOLUMES  CREATE/S  CREATE P50  P99";
        assert!(r.out.contains(header), "{}", r.out);
        assert!(
            r.out.contains("LIST ALL (median)  LIST ALL (min)"),
            "{}",
            r.out
        );
        assert!(r.out.contains("CreateVolume (probe)"), "{}", r.out);
        assert!(r.out.contains("DeleteVolume (probe)"), "{}", r.out);
        assert!(
            r.out.contains("CLEANUP  complete (6 volumes deleted)"),
            "{}",
            r.out
        );
        let table: Vec<&str> = r
            .out
            .lines()
            .skip_while(|l| !l.starts_with(header))
            .skip(1)
            .take(2)
            .collect();
        // 3 volumes in pages of 2: 2 pages; 6 volumes: 3 pages. No --pid: no RSS.
        let cells: Vec<Vec<&str>> = table
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(cells[0][0], "3", "{}", r.out);
        assert_eq!(cells[0][cells[0].len() - 3..], ["3", "2", "-"], "{}", r.out);
        assert_eq!(cells[1][0], "6", "{}", r.out);
        assert_eq!(cells[1][cells[1].len() - 3..], ["6", "3", "-"], "{}", r.out);
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_keep_leaves_the_volumes() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &[
                // The endpoint comes from `bench --endpoint` before the subcommand.
                "scale",
                "--steps",
                "5,12",
                "--probe-count",
                "3",
                "--keep",
                "-o",
                "json",
            ],
        )
        .await;
        assert_ok(&r);
        let j = r.json();
        assert_eq!(steps(&j).len(), 2);
        assert_eq!(j["cleanup"]["kept"], true);
        assert_eq!(j["cleanup"]["remaining"], 12);
        let prefix = j["name_prefix"].as_str().unwrap().to_owned();
        assert!(
            r.err.contains(&format!("kept 12 volumes named {prefix}*")),
            "{}",
            r.err
        );
        let state = s.state();
        assert_eq!(
            state.volumes.len(),
            12,
            "probes are deleted, the population kept"
        );
        assert!(
            state.names.keys().all(|n| n.starts_with(&prefix)),
            "{:?}",
            state.names
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_scale_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            op_delay: Duration::from_millis(5),
            ..Default::default()
        })
        .await;
        let cancel = CancelToken::new();
        let argv = [
            "scale",
            "--endpoint",
            &s.endpoint,
            "--steps",
            "5,100000",
            "--probe-count",
            "5",
            "--concurrency",
            "8",
            "-o",
            "json",
        ];
        let run = bench_with(&s, cancel.clone(), &argv);
        let interrupt = async {
            // Step 5 needs 10 creates (5 volumes, 5 probes); then step 100000 populates.
            wait_for(&s, |st| st.create_volume_calls >= 40).await;
            // The same call the SIGINT/SIGTERM handler makes.
            cancel.cancel();
        };
        let (r, ()) = tokio::join!(run, interrupt);
        assert_eq!(r.code, 130, "stdout: {}\nstderr: {}", r.out, r.err);
        let j = r.json();
        assert_eq!(j["interrupted"], true);
        assert_eq!(steps(&j).len(), 1, "only the finished step is reported");
        assert_eq!(steps(&j)[0]["volumes"], 5);
        assert!(j["volumes_created"].as_u64().unwrap() < 100_000);
        assert_eq!(j["cleanup"]["complete"], true, "{j:#}");
        assert!(
            r.err.contains("interrupted after 1 of 2 steps"),
            "{}",
            r.err
        );
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_reports_lost_list_entries() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            list_cap: Some(7),
            ..Default::default()
        })
        .await;
        let r = bench(
            &s,
            &[
                "scale",
                "--endpoint",
                &s.endpoint,
                "--steps",
                "10",
                "--probe-count",
                "1",
                "-o",
                "json",
            ],
        )
        .await;
        assert_eq!(r.code, 4, "stdout: {}\nstderr: {}", r.out, r.err);
        assert!(r.err.contains("pagination lost volumes"), "{}", r.err);
        let j = r.json();
        assert_eq!(steps(&j)[0]["list"]["entries"], 7);
        assert_eq!(j["failed_operations"], 1);
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_populate_failure_stops_and_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        // The fake refuses creates with a "fail" parameter (INVALID_ARGUMENT).
        let r = bench(
            &s,
            &[
                "scale",
                "--endpoint",
                &s.endpoint,
                "--steps",
                "4",
                "--param",
                "fail=1",
                "-o",
                "json",
            ],
        )
        .await;
        assert_eq!(r.code, 13, "INVALID_ARGUMENT: {}", r.err);
        let j = r.json();
        assert!(j["error"].as_str().unwrap().contains("INVALID_ARGUMENT"));
        assert!(steps(&j).is_empty());
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}
