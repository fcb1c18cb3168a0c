//! `stowage ctl` against the fake driver: every subcommand's happy path in table and JSON
//! form, error exit codes and messages, and secrets handling.

use serde_json::Value;
use stowage_client::ctl::execute;

use crate::fake::{Behavior, FakeServer};
use crate::logcapture::Capture;
use crate::{bounded, parse_ctl, LIMIT};

struct Run {
    code: u8,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        assert!(self.err.is_empty(), "unexpected stderr: {}", self.err);
        self
    }
}

async fn ctl_with(server: &FakeServer, env_secrets: Option<&str>, argv: &[&str]) -> Run {
    let mut full = vec!["--endpoint", server.endpoint.as_str()];
    full.extend_from_slice(argv);
    let args = parse_ctl(&full);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = execute(args, env_secrets, &mut out, &mut err).await;
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

async fn ctl(server: &FakeServer, argv: &[&str]) -> Run {
    ctl_with(server, None, argv).await
}

#[tokio::test]
async fn identity_info_caps_probe() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = ctl(&s, &["identity", "info"]).await.ok();
        assert!(
            r.out.contains("NAME            fake.csi.stowage.test"),
            "{}",
            r.out
        );
        assert!(r.out.contains("MANIFEST        commit=abc"), "{}", r.out);
        let j = ctl(&s, &["identity", "info", "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(j["name"], "fake.csi.stowage.test");
        assert_eq!(j["vendor_version"], "0.0.1");
        assert_eq!(j["manifest"]["commit"], "abc");

        let j = ctl(&s, &["-o", "json", "identity", "caps"])
            .await
            .ok()
            .json();
        assert_eq!(
            j["capabilities"],
            serde_json::json!(["CONTROLLER_SERVICE", "VOLUME_EXPANSION_ONLINE"])
        );
        let r = ctl(&s, &["identity", "caps"]).await.ok();
        assert!(
            r.out.starts_with("CAPABILITY\nCONTROLLER_SERVICE\n"),
            "{}",
            r.out
        );

        let r = ctl(&s, &["identity", "probe"]).await.ok();
        assert_eq!(r.out, "READY  true\n");
        let j = ctl(&s, &["identity", "probe", "--output", "json"])
            .await
            .ok()
            .json();
        assert_eq!(j["ready"], true);
    })
    .await;
}

#[tokio::test]
async fn volume_lifecycle() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let j = ctl(
            &s,
            &[
                "volume",
                "create",
                "v1",
                "--size",
                "1Gi",
                "--param",
                "tier=fast",
                "--fs",
                "ext4",
                "--topology",
                "zone=z1",
                "-o",
                "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["volume"]["volume_id"], "vol-v1");
        assert_eq!(j["volume"]["capacity_bytes"], 1u64 << 30);
        assert_eq!(j["volume"]["volume_context"]["fake"], "yes");
        assert_eq!(j["volume"]["accessible_topology"][0]["zone"], "z1");

        // Idempotent by name, table output.
        let r = ctl(&s, &["volume", "create", "v1", "--size", "1Gi"])
            .await
            .ok();
        assert!(r.out.contains("VOLUME ID  vol-v1"), "{}", r.out);
        assert!(
            r.out.contains("CAPACITY   1 GiB (1073741824 bytes)"),
            "{}",
            r.out
        );
        ctl(
            &s,
            &[
                "volume",
                "create",
                "v2",
                "--size",
                "500M",
                "--source-volume",
                "vol-v1",
            ],
        )
        .await
        .ok();
        ctl(
            &s,
            &[
                "volume",
                "create",
                "v3",
                "--block",
                "--access-mode",
                "multi-node-multi-writer",
            ],
        )
        .await
        .ok();
        assert_eq!(s.state().volumes.len(), 3);
        assert_eq!(s.state().volumes["vol-v2"].capacity_bytes, 500_000_000);

        let r = ctl(&s, &["volume", "get", "vol-v2"]).await.ok();
        assert!(
            r.out.contains("SOURCE           volume vol-v1"),
            "{}",
            r.out
        );
        assert!(r.out.contains("CONDITION        ok: healthy"), "{}", r.out);
        let j = ctl(&s, &["volume", "get", "vol-v1", "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(j["status"]["volume_condition"]["message"], "healthy");

        let r = ctl(&s, &["volume", "list"]).await.ok();
        let lines: Vec<&str> = r.out.lines().collect();
        assert!(lines[0].starts_with("VOLUME ID  CAPACITY"), "{}", r.out);
        assert_eq!(lines.len(), 4, "{}", r.out);
        let j = ctl(&s, &["volume", "list", "--max", "1", "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(j["entries"].as_array().map(Vec::len), Some(1));
        assert_eq!(j["next_token"], "1");
        let r = ctl(
            &s,
            &["volume", "list", "--max", "1", "--starting-token", "2"],
        )
        .await
        .ok();
        assert!(r.out.contains("vol-v3"), "{}", r.out);
        let j = ctl(&s, &["volume", "list", "--max", "1", "--all", "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(j["entries"].as_array().map(Vec::len), Some(3));
        assert_eq!(j["next_token"], "");

        let j = ctl(
            &s,
            &[
                "volume",
                "validate",
                "vol-v1",
                "--access-mode",
                "single-node-reader-only",
                "-o",
                "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(
            j["confirmed"]["volume_capabilities"][0]["access_mode"],
            "SINGLE_NODE_READER_ONLY"
        );
        let r = ctl(&s, &["volume", "validate", "vol-v1", "--block"])
            .await
            .ok();
        assert!(r.out.contains("CONFIRMED  no"), "{}", r.out);
        assert!(
            r.out.contains("MESSAGE    block volumes are not supported"),
            "{}",
            r.out
        );

        let j = ctl(
            &s,
            &["volume", "expand", "vol-v1", "--size", "2Gi", "-o", "json"],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["capacity_bytes"], 2u64 << 30);
        assert_eq!(j["node_expansion_required"], true);

        let r = ctl(
            &s,
            &["volume", "modify", "vol-v1", "--mutable-param", "iops=100"],
        )
        .await
        .ok();
        assert_eq!(r.out, "volume \"vol-v1\" modified\n");
        assert_eq!(s.state().volumes["vol-v1"].volume_context["iops"], "100");

        for id in ["vol-v1", "vol-v2", "vol-v3"] {
            let r = ctl(&s, &["volume", "delete", id]).await.ok();
            assert_eq!(r.out, format!("volume {id:?} deleted\n"));
        }
        // DeleteVolume of a missing volume succeeds (spec), JSON gives an empty object.
        let j = ctl(&s, &["volume", "delete", "vol-v1", "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(j, serde_json::json!({}));
        assert!(s.state().is_clean());
    })
    .await;
}

#[tokio::test]
async fn capacity_and_controller_publish() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            controller_publish: true,
            ..Default::default()
        })
        .await;
        let r = ctl(&s, &["capacity", "--param", "tier=fast"]).await.ok();
        assert!(
            r.out
                .contains("AVAILABLE            10 GiB (10737418240 bytes)"),
            "{}",
            r.out
        );
        assert!(r.out.contains("MINIMUM VOLUME SIZE  -"), "{}", r.out);
        let j = ctl(
            &s,
            &[
                "capacity",
                "--topology",
                "zone=z1",
                "--fs",
                "xfs",
                "-o",
                "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["available_capacity"], 10u64 << 30);
        assert_eq!(j["maximum_volume_size"], 1u64 << 40);
        assert_eq!(j["minimum_volume_size"], Value::Null);

        let j = ctl(&s, &["controller", "caps", "-o", "json"])
            .await
            .ok()
            .json();
        let caps = j["capabilities"].as_array().unwrap();
        assert!(caps.contains(&"CREATE_DELETE_VOLUME".into()));
        assert!(caps.contains(&"PUBLISH_UNPUBLISH_VOLUME".into()));

        s.add_volume("vol-a", 1 << 20);
        let j = ctl(
            &s,
            &[
                "controller",
                "publish",
                "vol-a",
                "node-1",
                "--readonly",
                "-o",
                "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["publish_context"]["device"], "/dev/fake0");
        let r = ctl(&s, &["volume", "list"]).await.ok();
        assert!(r.out.contains("node-1"), "{}", r.out);
        let r = ctl(&s, &["controller", "unpublish", "vol-a", "node-1"])
            .await
            .ok();
        assert_eq!(r.out, "volume \"vol-a\" unpublished from node \"node-1\"\n");
        assert!(s.state().controller_published.is_empty());
    })
    .await;
}

#[tokio::test]
async fn snapshots() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        s.add_volume("vol-src", 1 << 30);
        let j = ctl(
            &s,
            &[
                "snapshot", "create", "s1", "--source", "vol-src", "-o", "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["snapshot"]["snapshot_id"], "snap-s1");
        assert_eq!(j["snapshot"]["creation_time"], "2024-05-01T12:00:00Z");
        assert_eq!(j["snapshot"]["ready_to_use"], true);
        ctl(
            &s,
            &[
                "snapshot", "create", "s2", "--source", "vol-src", "--param", "k=v",
            ],
        )
        .await
        .ok();

        let r = ctl(&s, &["snapshot", "get", "snap-s1"]).await.ok();
        assert!(r.out.contains("SOURCE VOLUME  vol-src"), "{}", r.out);
        assert!(
            r.out.contains("CREATED        2024-05-01T12:00:00Z"),
            "{}",
            r.out
        );
        let r = ctl(&s, &["snapshot", "list"]).await.ok();
        assert!(
            r.out
                .starts_with("SNAPSHOT ID  SOURCE VOLUME  SIZE   READY"),
            "{}",
            r.out
        );
        assert_eq!(r.out.lines().count(), 3, "{}", r.out);
        let j = ctl(
            &s,
            &["snapshot", "list", "--snapshot-id", "snap-s2", "-o", "json"],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["entries"].as_array().map(Vec::len), Some(1));
        let j = ctl(
            &s,
            &["snapshot", "list", "--source-volume", "other", "-o", "json"],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["entries"], serde_json::json!([]));

        for id in ["snap-s1", "snap-s2"] {
            let r = ctl(&s, &["snapshot", "delete", id]).await.ok();
            assert_eq!(r.out, format!("snapshot {id:?} deleted\n"));
        }
        let r = ctl(&s, &["snapshot", "get", "snap-s1"]).await;
        assert_eq!(r.code, 15);
        assert_eq!(
            r.err,
            "error: NOT_FOUND: snapshot \"snap-s1\" does not exist\n"
        );
    })
    .await;
}

#[tokio::test]
async fn node_commands() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior {
            stage: true,
            ..Default::default()
        })
        .await;
        let r = ctl(&s, &["node", "info"]).await.ok();
        assert!(r.out.contains("NODE ID      fake-node"), "{}", r.out);
        assert!(r.out.contains("MAX VOLUMES  8"), "{}", r.out);
        assert!(r.out.contains("TOPOLOGY     zone=z1"), "{}", r.out);
        let j = ctl(&s, &["node", "info", "-o", "json"]).await.ok().json();
        assert_eq!(j["node_id"], "fake-node");
        assert_eq!(j["accessible_topology"]["zone"], "z1");
        let j = ctl(&s, &["node", "caps", "-o", "json"]).await.ok().json();
        assert!(j["capabilities"]
            .as_array()
            .unwrap()
            .contains(&"STAGE_UNSTAGE_VOLUME".into()));

        s.add_volume("vol-n", 1 << 30);
        let r = ctl(
            &s,
            &["node", "stage", "vol-n", "/stage/vol-n", "--fs", "ext4"],
        )
        .await
        .ok();
        assert_eq!(r.out, "volume \"vol-n\" staged at /stage/vol-n\n");
        assert_eq!(s.state().staged.len(), 1);

        // Publishing without the staging path is refused by a staging driver.
        let r = ctl(&s, &["node", "publish", "vol-n", "/pub/a"]).await;
        assert_eq!(r.code, 19, "{}", r.err);
        assert!(
            r.err.starts_with("error: FAILED_PRECONDITION: "),
            "{}",
            r.err
        );

        let r = ctl(
            &s,
            &[
                "node",
                "publish",
                "vol-n",
                "/pub/a",
                "--staging",
                "/stage/vol-n",
                "--readonly",
                "--mount-flag",
                "noatime",
            ],
        )
        .await
        .ok();
        assert_eq!(r.out, "volume \"vol-n\" published at /pub/a\n");
        assert_eq!(s.state().published.len(), 1);

        let r = ctl(&s, &["node", "stats", "vol-n", "/pub/a"]).await.ok();
        assert!(
            r.out.contains("BYTES   1 GiB  512 MiB  512 MiB"),
            "{}",
            r.out
        );
        assert!(r.out.contains("INODES  1000   100      900"), "{}", r.out);
        let j = ctl(
            &s,
            &[
                "node",
                "stats",
                "vol-n",
                "/pub/a",
                "--staging",
                "/stage/vol-n",
                "-o",
                "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["usage"][0]["unit"], "BYTES");
        assert_eq!(j["usage"][1]["used"], 100);

        let j = ctl(
            &s,
            &[
                "node", "expand", "vol-n", "/pub/a", "--size", "1Gi", "-o", "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(j["capacity_bytes"], 1u64 << 30);

        let r = ctl(&s, &["node", "unpublish", "vol-n", "/pub/a"])
            .await
            .ok();
        assert_eq!(r.out, "volume \"vol-n\" unpublished from /pub/a\n");
        let j = ctl(
            &s,
            &["node", "unstage", "vol-n", "/stage/vol-n", "-o", "json"],
        )
        .await
        .ok()
        .json();
        assert_eq!(j, serde_json::json!({}));
        assert!(s.state().staged.is_empty() && s.state().published.is_empty());
    })
    .await;
}

#[tokio::test]
async fn failing_call_maps_grpc_code_to_exit_code() {
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let r = ctl(&s, &["volume", "get", "x"]).await;
        assert_eq!(r.code, 15, "NOT_FOUND (5) -> 10 + 5");
        assert_eq!(r.err, "error: NOT_FOUND: volume \"x\" does not exist\n");
        assert!(r.out.is_empty());
        // The same in JSON mode: errors never go to stdout.
        let r = ctl(&s, &["volume", "get", "x", "-o", "json"]).await;
        assert_eq!((r.code, r.out.as_str()), (15, ""));

        let r = ctl(&s, &["volume", "create", ""]).await;
        assert_eq!(r.code, 13, "INVALID_ARGUMENT (3)");
        assert_eq!(r.err, "error: INVALID_ARGUMENT: name is required\n");
    })
    .await;
}

#[tokio::test]
async fn connection_usage_and_timeout_errors() {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("unix://{}/none.sock", dir.path().display());
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = execute(
            parse_ctl(&["--endpoint", &missing, "identity", "probe"]),
            None,
            &mut out,
            &mut err,
        )
        .await;
        let err = String::from_utf8(err).unwrap();
        assert_eq!(code, 3, "{err}");
        assert!(
            err.starts_with(&format!("error: cannot connect to {missing}: ")),
            "{err}"
        );

        let mut err = Vec::new();
        let code = execute(
            parse_ctl(&["--endpoint", "ftp://x", "identity", "probe"]),
            None,
            &mut Vec::new(),
            &mut err,
        )
        .await;
        assert_eq!(code, 2, "{}", String::from_utf8_lossy(&err));

        let s = FakeServer::start(Behavior {
            op_delay: std::time::Duration::from_secs(5),
            ..Default::default()
        })
        .await;
        // Two access modes where the RPC takes one capability: usage error, no call made.
        let r = ctl(
            &s,
            &[
                "node",
                "publish",
                "v",
                "/t",
                "--access-mode",
                "single-node-writer",
                "--access-mode",
                "multi-node-multi-writer",
            ],
        )
        .await;
        assert_eq!(r.code, 2, "{}", r.err);
        assert!(r.err.contains("single volume capability"), "{}", r.err);

        let started = std::time::Instant::now();
        let r = ctl(&s, &["--timeout", "200ms", "volume", "create", "slow"]).await;
        assert_eq!(r.code, 14, "DEADLINE_EXCEEDED (4): {}", r.err);
        assert!(r.err.starts_with("error: DEADLINE_EXCEEDED: "), "{}", r.err);
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
    })
    .await;
}

const SECRET: &str = "hunter2-very-secret";

#[tokio::test]
async fn secrets_are_sent_but_never_printed_or_logged() {
    let capture = Capture::default();
    // #[tokio::test] runs everything (client, fake server) on this thread, so a
    // thread-scoped subscriber sees every log line of both.
    let _guard = tracing::subscriber::set_default(capture.clone());
    bounded(LIMIT, async {
        let s = FakeServer::start(Behavior::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secrets");
        std::fs::write(
            &file,
            format!("# test\nusername=admin\npassword={SECRET}\n"),
        )
        .unwrap();
        let file = file.to_str().unwrap();

        let mut printed = String::new();
        for output in ["table", "json"] {
            let r = ctl(
                &s,
                &[
                    "--secrets-file",
                    file,
                    "-o",
                    output,
                    "volume",
                    "create",
                    "sv",
                ],
            )
            .await
            .ok();
            printed += &r.out;
        }
        assert_eq!(s.state().last_secrets["password"], SECRET);
        assert_eq!(s.state().last_secrets["username"], "admin");

        // A driver that echoes secrets in an error: the message is scrubbed.
        let r = ctl(
            &s,
            &[
                "--secrets-file",
                file,
                "volume",
                "create",
                "sv2",
                "--param",
                "fail=1",
            ],
        )
        .await;
        assert_eq!(r.code, 13);
        assert!(r.err.contains("<redacted>"), "{}", r.err);
        printed += &r.out;
        printed += &r.err;

        // CSI_SECRETS (passed in as the run() entry point would read it).
        let env = format!("token={SECRET}");
        let r = ctl_with(
            &s,
            Some(&env),
            &[
                "snapshot", "create", "snap", "--source", "vol-sv", "-o", "json",
            ],
        )
        .await
        .ok();
        printed += &r.out;
        assert_eq!(s.state().last_secrets["token"], SECRET);

        // A malformed secrets file is a local error that does not quote the file.
        std::fs::write(dir.path().join("bad"), format!("{SECRET}\n")).unwrap();
        let bad = dir.path().join("bad");
        let r = ctl(
            &s,
            &["--secrets-file", bad.to_str().unwrap(), "identity", "probe"],
        )
        .await;
        assert_eq!(r.code, 1);
        assert!(r.err.contains("line 1: expected key=value"), "{}", r.err);
        printed += &r.err;

        assert!(!printed.contains(SECRET), "secret printed:\n{printed}");
        assert!(!printed.contains("hunter2"), "secret printed:\n{printed}");
    })
    .await;
    let logs = capture.text.lock().unwrap().clone();
    assert!(
        logs.contains("CreateVolume"),
        "capture saw no client logs:\n{logs}"
    );
    assert!(!logs.contains("hunter2"), "secret in logs:\n{logs}");
}
