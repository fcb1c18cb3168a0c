//! `stowage ctl` and `stowage bench` against the real driver: every ctl subcommand's happy
//! path, failing calls whose exit code and message carry the gRPC code, and a bench run whose
//! cleanup leaves nothing behind.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn ctl(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("ctl")
        .arg("--endpoint")
        .arg(&h.endpoint)
        .arg("--timeout")
        .arg("20s")
        .args(args)
        .output()
        .expect("run stowage ctl")
}

fn ok(h: &Harness, args: &[&str]) -> String {
    let out = ctl(h, args);
    assert!(
        out.status.success(),
        "ctl {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(h: &Harness, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(h, &all)).expect("ctl -o json prints JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_drives_every_service() {
    bounded(async {
        let h = Harness::start(&[]).await;
        assert!(ok(&h, &["identity", "info"]).contains("stowage.csi.dev"));
        assert!(ok(&h, &["identity", "caps"])
            .to_uppercase()
            .contains("CONTROLLER_SERVICE"));
        assert!(ok(&h, &["identity", "probe"])
            .to_lowercase()
            .contains("true"));
        assert!(ok(&h, &["controller", "caps"])
            .to_uppercase()
            .contains("CREATE_DELETE_VOLUME"));

        let created = json(
            &h,
            &[
                "volume",
                "create",
                "ctl-vol",
                "--size",
                "2Mi",
                "--param",
                "pool=default",
            ],
        );
        let id = created["volume"]["volume_id"]
            .as_str()
            .expect("volume id")
            .to_owned();
        assert_eq!(created["volume"]["capacity_bytes"], 2 << 20);
        // Idempotent through the CLI too.
        let again = json(
            &h,
            &[
                "volume",
                "create",
                "ctl-vol",
                "--size",
                "2Mi",
                "--param",
                "pool=default",
            ],
        );
        assert_eq!(again["volume"]["volume_id"].as_str(), Some(id.as_str()));

        assert!(ok(&h, &["volume", "list"]).contains(&id));
        assert!(ok(&h, &["volume", "get", &id]).contains(&id));
        let validated = ok(&h, &["volume", "validate", &id]);
        assert!(
            validated.to_lowercase().contains("confirmed"),
            "{validated}"
        );
        let cap = json(&h, &["capacity"]);
        assert!(cap["available_capacity"].as_i64().unwrap() > 0, "{cap}");
        assert!(ok(&h, &["node", "info"]).contains("node-a"));
        assert!(ok(&h, &["node", "caps"])
            .to_uppercase()
            .contains("STAGE_UNSTAGE_VOLUME"));

        if root_or_skip("ctl_drives_every_service (node stage/publish part)") {
            let staging = h.kubelet().join("staging-ctl");
            let pods = h.kubelet().join("pods/ctl");
            std::fs::create_dir_all(&pods).unwrap();
            let target = pods.join("mount");
            let (s, t) = (staging.to_str().unwrap(), target.to_str().unwrap());
            ok(&h, &["node", "stage", &id, s]);
            ok(&h, &["node", "publish", &id, t, "--staging", s]);
            assert_eq!(mount_count(&target), 1);
            let stats = json(&h, &["node", "stats", &id, t]);
            assert!(
                stats.to_string().contains("BYTES") || stats.to_string().contains("bytes"),
                "{stats}"
            );
            ok(&h, &["node", "unpublish", &id, t]);
            ok(&h, &["node", "unstage", &id, s]);
            assert!(mounts_under(h.dir.path()).is_empty());
        }

        ok(&h, &["volume", "delete", &id]);
        ok(&h, &["volume", "delete", &id]);
        assert!(!ok(&h, &["volume", "list"]).contains(&id));
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_calls_carry_the_grpc_code() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let cases: &[(&[&str], i32, &str)] = &[
            (
                &["volume", "get", "stw-00000000000000000000000000000000"],
                10 + 5,
                "NOT_FOUND",
            ),
            (
                &["volume", "create", "bad", "--param", "replicas=3"],
                10 + 3,
                "INVALID_ARGUMENT",
            ),
            (
                &[
                    "controller",
                    "publish",
                    "stw-00000000000000000000000000000000",
                    "n",
                ],
                10 + 12,
                "UNIMPLEMENTED",
            ),
            (&["snapshot", "get", "../../etc"], 10 + 5, "NOT_FOUND"),
            (
                &["volume", "list", "--starting-token", "bogus"],
                10 + 10,
                "ABORTED",
            ),
        ];
        for (args, exit, name) in cases {
            let out = ctl(&h, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(*exit), "ctl {args:?}: {stderr}");
            assert!(
                stderr.contains(name),
                "ctl {args:?} stderr does not name {name}: {stderr}"
            );
        }
        // A driver that is not there.
        let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args([
                "ctl",
                "--endpoint",
                "unix:///nonexistent/stowage.sock",
                "identity",
                "info",
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Secrets are sent but never echoed.
        let secrets = h.dir.path().join("secrets");
        std::fs::write(&secrets, "password=s3cr3t-value-xyz\n").unwrap();
        let out = ctl(
            &h,
            &[
                "--secrets-file",
                secrets.to_str().unwrap(),
                "volume",
                "create",
                "with-secret",
                "--size",
                "1Mi",
            ],
        );
        assert!(out.status.success());
        let all = format!(
            "{}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            h.log_text()
        );
        assert!(
            !all.contains("s3cr3t-value-xyz"),
            "a secret was echoed or logged"
        );
    })
    .await
}

fn bench(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("bench")
        .arg("--endpoint")
        .arg(&h.endpoint)
        .args(args)
        .output()
        .expect("run stowage bench")
}

fn volume_dirs(h: &Harness) -> usize {
    std::fs::read_dir(h.pool_volumes())
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_end_to_end_and_cleans_up() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let pid = h.child.as_ref().unwrap().id().to_string();
        let out = bench(
            &h,
            &[
                "--workload",
                "create-delete",
                "--count",
                "40",
                "--concurrency",
                "4",
                "--pid",
                &pid,
                "--output",
                "json",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench -o json");
        assert!(report.to_string().contains("CreateVolume"), "{report}");
        assert_eq!(volume_dirs(&h), 0, "bench left volumes behind");

        if root_or_skip("bench_runs_end_to_end_and_cleans_up (publish-unpublish part)") {
            let target = h.kubelet().join("bench");
            std::fs::create_dir_all(&target).unwrap();
            let out = bench(
                &h,
                &[
                    "--workload",
                    "publish-unpublish",
                    "--count",
                    "40",
                    "--concurrency",
                    "2",
                    "--target-dir",
                    target.to_str().unwrap(),
                ],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                mounts_under(h.dir.path()).is_empty(),
                "bench left mounts behind"
            );
            assert_eq!(volume_dirs(&h), 0, "bench left volumes behind");
            let leftovers: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
            assert!(
                leftovers.is_empty(),
                "bench left {leftovers:?} in its target dir"
            );
        }
        let mut c = h.controller().await;
        let list = c
            .list_volumes(stowage_csi::v1::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.entries.is_empty());
    })
    .await
}

#[test]
fn bench_floor_leaves_no_mounts() {
    if !root_or_skip("bench_floor_leaves_no_mounts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["bench", "floor", "--count", "50", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.to_lowercase().contains("mount"), "{text}");
    assert!(mounts_under(dir.path()).is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "floor left files in {}",
        Path::new(dir.path()).display()
    );
}

/// The socket is root's alone unless a group is configured; then that group may connect too.
#[tokio::test(flavor = "multi_thread")]
async fn the_socket_is_owner_only_unless_a_group_is_named() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    bounded(async {
        let h = Harness::start(&[]).await;
        let sock = h.dir.path().join("csi.sock");
        let meta = std::fs::metadata(&sock).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(h);
        let h = Harness::start(&["--socket-group", "4321"]).await;
        let meta = std::fs::metadata(h.dir.path().join("csi.sock")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 4321);
    })
    .await;
}
