//! `stowage bench` end to end against the fake driver: every workload runs and leaves the
//! driver empty, including when interrupted and when creates time out.

use std::time::Duration;

use serde_json::Value;
use stowage_client::bench::{execute, CancelToken, Options};

use crate::fake::{Behavior, FakeServer};
use crate::{bounded, parse_bench, LIMIT};

pub(crate) struct Run {
    pub(crate) code: u8,
    pub(crate) out: String,
    pub(crate) err: String,
}

impl Run {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }
}

pub(crate) async fn bench_with(server: &FakeServer, cancel: CancelToken, argv: &[&str]) -> Run {
    let mut full = vec!["--endpoint", server.endpoint.as_str()];
    full.extend_from_slice(argv);
    let args = parse_bench(&full);
    let options = Options {
        env_secrets: None,
        cancel,
        progress: false,
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = execute(args, options, &mut out, &mut err).await;
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

pub(crate) async fn bench(server: &FakeServer, argv: &[&str]) -> Run {
    bench_with(server, CancelToken::new(), argv).await
}

fn call<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["calls"]
        .as_array()
        .and_then(|calls| calls.iter().find(|c| c["call"] == name))
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

#[track_caller]
fn assert_complete(r: &Run, report: &Value, count: u64) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.out, r.err);
    assert_eq!(report["requested"], count);
    assert_eq!(report["completed"], count);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["interrupted"], false);
    assert_eq!(report["cleanup"]["complete"], true, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_delete_runs_and_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let pid = std::process::id().to_string();
        let r = bench(
            &s,
            &[
                "--count",
                "20",
                "--concurrency",
                "4",
                "--size",
                "1Mi",
                "--param",
                "tier=fast",
                "--pid",
                &pid,
                "-o",
                "json",
            ],
        )
        .await;
        let j = r.json();
        assert_complete(&r, &j, 20);
        assert_eq!(j["workload"], "create-delete");
        assert_eq!(j["driver"]["name"], "fake.csi.stowage.test");
        assert_eq!(j["concurrency"], 4);
        for name in ["CreateVolume", "DeleteVolume"] {
            let c = call(&j, name);
            assert_eq!(c["ok"], 20);
            assert_eq!(c["errors"], 0);
            let (p50, p99, max) = (
                c["p50_ms"].as_f64(),
                c["p99_ms"].as_f64(),
                c["max_ms"].as_f64(),
            );
            assert!(p50 <= p99 && p99 <= max, "{c}");
        }
        assert!(j["ops_per_second"].as_f64().unwrap() > 0.0);
        // The fake runs in this process, so its RSS is ours.
        assert!(j["driver_rss"]["before_bytes"].as_u64().unwrap() > 0);
        assert!(j["driver_rss"]["after_cleanup_bytes"].as_u64().unwrap() > 0);
        let state = s.state();
        assert!(state.is_clean(), "{state:?}");
        assert_eq!(state.create_volume_calls, 20);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_report() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &["--count", "5", "--concurrency", "2", "--connections", "2"],
        )
        .await;
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(r.out.contains("WORKLOAD     create-delete"), "{}", r.out);
        assert!(r.out.contains("CALL          OK  ERRORS  P50"), "{}", r.out);
        assert!(
            r.out.contains("2 workers over 2 connection(s)"),
            "{}",
            r.out
        );
        assert!(r.out.contains("CLEANUP  complete"), "{}", r.out);
        assert!(s.state().is_clean());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_unpublish_stages_publishes_and_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            stage: true,
            controller_publish: true,
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bench");
        let r = bench(
            &s,
            &[
                "--workload",
                "publish-unpublish",
                "--count",
                "20",
                "--concurrency",
                "4",
                "--target-dir",
                target.to_str().unwrap(),
                "-o",
                "json",
            ],
        )
        .await;
        let j = r.json();
        assert_complete(&r, &j, 20);
        assert_eq!(call(&j, "NodePublishVolume")["ok"], 20);
        assert_eq!(call(&j, "NodeUnpublishVolume")["ok"], 20);
        assert!(s.state().is_clean(), "{:?}", s.state());
        // The bench created the target dir (and staging dirs) and removed them again.
        assert!(!target.exists(), "target dir left behind");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_unpublish_with_given_volume_keeps_it() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        s.add_volume("vol-keep", 1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let r = bench(
            &s,
            &[
                "--workload",
                "publish-unpublish",
                "--count",
                "6",
                "--concurrency",
                "1",
                "--volume-id",
                "vol-keep",
                "--target-dir",
                dir.path().to_str().unwrap(),
                "-o",
                "json",
            ],
        )
        .await;
        assert_complete(&r, &r.json(), 6);
        let state = s.state();
        assert!(
            state.volumes.contains_key("vol-keep"),
            "given volume must not be deleted"
        );
        assert!(state.published.is_empty() && state.staged.is_empty());
        // The directory existed before: it is left in place, and empty.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_workload() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &[
                "--workload",
                "snapshot",
                "--count",
                "20",
                "--concurrency",
                "4",
                "-o",
                "json",
            ],
        )
        .await;
        let j = r.json();
        assert_complete(&r, &j, 20);
        assert_eq!(call(&j, "CreateSnapshot")["ok"], 20);
        assert_eq!(call(&j, "DeleteSnapshot")["ok"], 20);
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            stage: true,
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let r = bench(
            &s,
            &[
                "--workload",
                "mixed",
                "--count",
                "21",
                "--concurrency",
                "4",
                "--connections",
                "3",
                "--target-dir",
                target.to_str().unwrap(),
                "-o",
                "json",
            ],
        )
        .await;
        let j = r.json();
        assert_complete(&r, &j, 21);
        for name in ["CreateVolume", "NodePublishVolume", "CreateSnapshot"] {
            assert_eq!(call(&j, name)["ok"], 7, "{name}");
        }
        assert!(s.state().is_clean(), "{:?}", s.state());
        assert!(!target.exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_workload_counts_two_probes_per_operation() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &[
                "--workload",
                "probe",
                "--count",
                "10",
                "--concurrency",
                "3",
                "-o",
                "json",
            ],
        )
        .await;
        let j = r.json();
        assert_complete(&r, &j, 10);
        assert_eq!(j["workload"], "probe");
        assert_eq!(call(&j, "Probe")["ok"], 20);
        assert_eq!(j["calls"].as_array().unwrap().len(), 1, "{j:#}");
        let state = s.state();
        assert!(state.is_clean(), "{state:?}");
        assert_eq!(state.create_volume_calls, 0);
        assert_eq!(state.node_publish_calls, 0);
    })
    .await;
}

const TARGET_DIR_HINT: &str =
    "pass --target-dir with a directory under the driver's kubelet directory";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_staging_path_says_to_pass_target_dir() {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir(&kubelet).unwrap();
        let s = FakeServer::start(Behavior {
            stage: true,
            allowed_dir: Some(kubelet.clone()),
            ..Default::default()
        })
        .await;
        let outside = dir.path().join("elsewhere");
        let argv = |target: &str| {
            [
                "--workload",
                "publish-unpublish",
                "--count",
                "4",
                "--concurrency",
                "2",
                "--target-dir",
                target,
                "-o",
                "json",
            ]
            .map(str::to_owned)
        };
        let refused = argv(outside.to_str().unwrap());
        let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
        let r = bench(&s, &refused).await;
        // 10 + INVALID_ARGUMENT (3): the driver's refusal at setup.
        assert_eq!(r.code, 13, "stdout: {}\nstderr: {}", r.out, r.err);
        assert!(
            r.err.contains("NodeStageVolume: INVALID_ARGUMENT"),
            "{}",
            r.err
        );
        assert!(r.err.contains(TARGET_DIR_HINT), "{}", r.err);
        let j = r.json();
        assert!(
            j["setup_error"].as_str().unwrap().contains(TARGET_DIR_HINT),
            "{j:#}"
        );
        assert_eq!(j["completed"], 0);
        assert_eq!(s.state().node_publish_calls, 0);
        assert!(s.state().is_clean(), "{:?}", s.state());
        assert!(!outside.exists(), "target dir left behind");

        // The same run with the target dir under the allowed directory goes through.
        let inside = kubelet.join("bench");
        let accepted = argv(inside.to_str().unwrap());
        let accepted: Vec<&str> = accepted.iter().map(String::as_str).collect();
        let r = bench(&s, &accepted).await;
        assert_complete(&r, &r.json(), 4);
        assert!(!r.err.contains("--target-dir"), "{}", r.err);
        assert!(s.state().is_clean(), "{:?}", s.state());
        assert!(!inside.exists(), "target dir left behind");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_target_path_stops_the_run_and_says_to_pass_target_dir() {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        // No staging: the first call that carries a path is NodePublishVolume.
        let s = FakeServer::start(Behavior {
            allowed_dir: Some(dir.path().join("kubelet")),
            ..Default::default()
        })
        .await;
        let outside = dir.path().join("elsewhere");
        let r = bench(
            &s,
            &[
                "--workload",
                "publish-unpublish",
                "--count",
                "1000",
                "--concurrency",
                "2",
                "--target-dir",
                outside.to_str().unwrap(),
                "-o",
                "json",
            ],
        )
        .await;
        assert_eq!(r.code, 13, "stdout: {}\nstderr: {}", r.out, r.err);
        assert!(
            r.err.contains("NodePublishVolume: INVALID_ARGUMENT"),
            "{}",
            r.err
        );
        assert!(r.err.contains(TARGET_DIR_HINT), "{}", r.err);
        let j = r.json();
        assert!(
            j["setup_error"].as_str().unwrap().contains(TARGET_DIR_HINT),
            "{j:#}"
        );
        // Each worker stops after its first refused publication.
        let calls = s.state().node_publish_calls;
        assert!((1..=2).contains(&calls), "{calls} publications tried");
        assert_eq!(
            call(&j, "NodePublishVolume")["errors"].as_u64(),
            Some(calls as u64)
        );
        assert!(s.state().is_clean(), "{:?}", s.state());
        assert!(!outside.exists(), "target dir left behind");
    })
    .await;
}

/// Waits until `pred` holds on the fake's state.
pub(crate) async fn wait_for(s: &FakeServer, pred: impl Fn(&crate::fake::State) -> bool) {
    while !pred(&s.state()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_create_delete_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            op_delay: Duration::from_millis(5),
            ..Default::default()
        })
        .await;
        let cancel = CancelToken::new();
        let run = bench_with(
            &s,
            cancel.clone(),
            &["--count", "100000", "--concurrency", "4", "-o", "json"],
        );
        let interrupt = async {
            wait_for(&s, |st| st.create_volume_calls >= 10).await;
            // The same call the SIGINT/SIGTERM handler makes.
            cancel.cancel();
        };
        let (r, ()) = tokio::join!(run, interrupt);
        assert_eq!(r.code, 130, "stdout: {}\nstderr: {}", r.out, r.err);
        let j = r.json();
        assert_eq!(j["interrupted"], true);
        assert_eq!(j["cleanup"]["complete"], true);
        assert!(j["completed"].as_u64().unwrap() < 100_000);
        assert!(r.err.contains("interrupted after"), "{}", r.err);
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_publish_unpublish_cleans_up() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            stage: true,
            controller_publish: true,
            op_delay: Duration::from_millis(5),
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let cancel = CancelToken::new();
        let argv = [
            "--workload",
            "publish-unpublish",
            "--count",
            "100000",
            "--concurrency",
            "3",
            "--target-dir",
            target.to_str().unwrap(),
        ];
        let run = bench_with(&s, cancel.clone(), &argv);
        let interrupt = async {
            // Cancel while publications are in flight (each takes 5ms in the fake).
            wait_for(&s, |st| st.node_publish_calls >= 10).await;
            cancel.cancel();
        };
        let (r, ()) = tokio::join!(run, interrupt);
        assert_eq!(r.code, 130, "stdout: {}\nstderr: {}", r.out, r.err);
        assert!(r.out.contains("INTERRUPTED  yes"), "{}", r.out);
        assert!(s.state().is_clean(), "{:?}", s.state());
        assert!(!target.exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_start_still_cleans_setup() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let cancel = CancelToken::new();
        cancel.cancel();
        let r = bench_with(
            &s,
            cancel,
            &["--workload", "snapshot", "--count", "5", "-o", "json"],
        )
        .await;
        assert_eq!(r.code, 130, "{}", r.err);
        assert_eq!(r.json()["completed"], 0);
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_that_time_out_are_found_by_name_and_deleted() {
    bounded(LIMIT, async {
        // Each first CreateVolume stores the volume but answers after 1s; the bench gives
        // up after 200ms, so it never learns the IDs.
        let s = FakeServer::start(Behavior {
            slow_first_create: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .await;
        let r = bench(
            &s,
            &[
                "--count",
                "3",
                "--concurrency",
                "1",
                "--timeout",
                "200ms",
                "-o",
                "json",
            ],
        )
        .await;
        let j = r.json();
        assert_eq!(r.code, 4, "some operations failed: {}", r.err);
        assert_eq!(j["failed"], 3);
        assert_eq!(call(&j, "CreateVolume")["errors"], 3);
        assert!(call(&j, "CreateVolume")["first_error"]
            .as_str()
            .unwrap()
            .starts_with("DEADLINE_EXCEEDED"));
        assert_eq!(j["cleanup"]["complete"], true, "{j:#}");
        assert!(s.state().is_clean(), "{:?}", s.state());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_failure_reports_grpc_code() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = bench(
            &s,
            &[
                "--workload",
                "snapshot",
                "--volume-id",
                "nope",
                "--count",
                "2",
            ],
        )
        .await;
        assert_eq!(r.code, 15, "{}", r.err);
        assert!(r.err.contains("NOT_FOUND"), "{}", r.err);
        assert!(!r.err.contains("--target-dir"), "{}", r.err);
        assert!(s.state().is_clean());
    })
    .await;
}

#[tokio::test]
async fn unreachable_driver_is_exit_3() {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix://{}/x.sock", dir.path().display());
        let args = parse_bench(&["--endpoint", &endpoint, "--count", "1"]);
        let mut err = Vec::new();
        let code = execute(args, Options::default(), &mut Vec::new(), &mut err).await;
        assert_eq!(code, 3, "{}", String::from_utf8_lossy(&err));
    })
    .await;
}
