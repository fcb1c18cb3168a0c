//! What an operator watches, over the real socket and real loopback TCP: the JSON log (one
//! line per call with method, volume, outcome and duration; never a secret), the Prometheus
//! metrics (counters that move by exactly the calls made, no volume id anywhere) and the
//! health endpoints (/readyz and CSI Probe agree: not ready before reconciliation or with a
//! pool that cannot be written, ready otherwise).

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::Code;

/// Values that must never reach the log.
const SENTINELS: [&str; 4] = [
    "HUNTER2-SENTINEL",
    "SECRET-MAP-SENTINEL",
    "CONTEXT-TOKEN-SENTINEL",
    "STAGE-SECRET-SENTINEL",
];

fn secrets() -> HashMap<String, String> {
    [
        ("password".to_owned(), "SECRET-MAP-SENTINEL".to_owned()),
        ("apiToken".to_owned(), "SECRET-MAP-SENTINEL".to_owned()),
    ]
    .into()
}

/// The driver's log as JSON objects (every line must be one).
fn json_lines(h: &Harness) -> Vec<Value> {
    h.log_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The per-call lines of `method` on `volume`.
fn call_lines<'a>(lines: &'a [Value], method: &str, volume: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["method"] == method && l["fields"]["volume"] == volume)
        .collect()
}

/// Checks the one line of each `(method, volume, outcome)` call.
fn assert_one_line_each(lines: &[Value], calls: &[(&str, &str, &str)]) {
    let mut expected: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (method, volume, outcome) in calls {
        expected.entry((method, volume)).or_default().push(outcome);
    }
    for ((method, volume), outcomes) in expected {
        let found = call_lines(lines, method, volume);
        assert_eq!(
            found.len(),
            outcomes.len(),
            "{method} on {volume}: {} lines for {} calls: {found:#?}",
            found.len(),
            outcomes.len()
        );
        for (line, outcome) in found.iter().zip(outcomes) {
            let f = &line["fields"];
            assert_eq!(f["outcome"], outcome, "{line}");
            let ms = f["duration_ms"].as_f64().expect("duration_ms is a number");
            assert!((0.0..120_000.0).contains(&ms), "{line}");
            // The volume is the plain string, not a quoted one inside the string.
            assert!(!f["volume"].as_str().unwrap().contains('"'), "{line}");
        }
    }
}

fn assert_no_sentinel(h: &Harness) {
    let log = h.log_text();
    for s in SENTINELS {
        assert!(!log.contains(s), "{s} reached the log:\n{log}");
    }
}

#[tokio::test]
async fn json_log_one_line_per_controller_call_and_no_secret() {
    bounded(async {
        let h = Harness::start(&["--log-format", "json"]).await;
        let mut c = h.controller().await;

        // A secret-looking parameter is refused (unknown key), naming the key, never the value.
        let mut bad = create_req("obs-refused", 1 << 20);
        bad.parameters
            .insert("password".into(), "HUNTER2-SENTINEL".into());
        bad.secrets = secrets();
        let refused = c.create_volume(bad).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(!refused.message().contains("HUNTER2-SENTINEL"));

        let mut req = create_req("obs-one", 1 << 20);
        req.secrets = secrets();
        let id = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        c.create_volume(req).await.unwrap();
        let mut conflict = create_req("obs-one", 8 << 20);
        conflict.capacity_range.as_mut().unwrap().limit_bytes = 8 << 20;
        conflict.secrets = secrets();
        assert_eq!(code(c.create_volume(conflict).await), Code::AlreadyExists);
        for _ in 0..2 {
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: secrets(),
            })
            .await
            .unwrap();
        }

        let lines = json_lines(&h);
        assert_one_line_each(
            &lines,
            &[
                ("CreateVolume", "obs-refused", "InvalidArgument"),
                ("CreateVolume", "obs-one", "OK"),
                ("CreateVolume", "obs-one", "OK"),
                ("CreateVolume", "obs-one", "AlreadyExists"),
                ("DeleteVolume", &id, "OK"),
                ("DeleteVolume", &id, "OK"),
            ],
        );
        assert_no_sentinel(&h);
    })
    .await
}

#[tokio::test]
async fn json_log_one_line_per_node_call_and_no_secret() {
    if !root_or_skip("json_log_one_line_per_node_call_and_no_secret") {
        return;
    }
    bounded(async {
        let h = Harness::start(&["--log-format", "json"]).await;
        let mut c = h.controller().await;
        let mut n = h.node().await;
        let v = create_volume(&mut c, "obs-node", 8 << 20).await;
        let id = v.volume_id;
        let staging = h.kubelet().join("plugins/obs/globalmount");
        let target = h.kubelet().join("pods/uid-obs/volumes/mount");
        std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let context: HashMap<String, String> = [
            ("pool".to_owned(), "default".to_owned()),
            (
                "accessToken".to_owned(),
                "CONTEXT-TOKEN-SENTINEL".to_owned(),
            ),
            ("DB_PASSWORD".to_owned(), "HUNTER2-SENTINEL".to_owned()),
            ("credentialKey".to_owned(), "HUNTER2-SENTINEL".to_owned()),
        ]
        .into();
        let stage = csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            secrets: [("password".to_owned(), "STAGE-SECRET-SENTINEL".to_owned())].into(),
            volume_context: context.clone(),
            ..Default::default()
        };
        n.node_stage_volume(stage.clone()).await.unwrap();
        n.node_stage_volume(stage).await.unwrap();
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            secrets: secrets(),
            volume_context: context,
            ..Default::default()
        })
        .await
        .unwrap();
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets(),
        })
        .await
        .unwrap();

        let lines = json_lines(&h);
        assert_one_line_each(
            &lines,
            &[
                ("CreateVolume", "obs-node", "OK"),
                ("NodeStageVolume", &id, "OK"),
                ("NodeStageVolume", &id, "OK"),
                ("NodePublishVolume", &id, "OK"),
                ("NodeUnpublishVolume", &id, "OK"),
                ("NodeUnstageVolume", &id, "OK"),
                ("DeleteVolume", &id, "OK"),
            ],
        );
        assert_no_sentinel(&h);
    })
    .await
}

// ---- HTTP over loopback

/// `GET path` over a fresh HTTP/1.1 connection: (status, body).
fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(address).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, body.to_owned())
}

/// The address the driver says it serves `paths` on (its log, text or JSON).
fn http_address(log: &str, paths: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        (v["fields"]["paths"] == paths)
            .then(|| v["fields"]["address"].as_str().map(str::to_owned))
            .flatten()
    })
}

fn wait_for_address(h: &Harness, paths: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(a) = http_address(&h.log_text(), paths) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no {paths} address in the log:\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The samples of a Prometheus text exposition: (name, labels) → value.
fn samples(text: &str) -> HashMap<(String, BTreeMap<String, String>), f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let labels = rest
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").expect("k=\"v\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        assert!(
            out.insert((name, labels), value).is_none(),
            "a series twice: {line}"
        );
    }
    out
}

fn sample(
    s: &HashMap<(String, BTreeMap<String, String>), f64>,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_owned(), labels)).copied().unwrap_or(0.0)
}

async fn probe_ready(h: &Harness) -> bool {
    h.identity()
        .await
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready
        == Some(true)
}

/// Waits (bounded) until /readyz answers `status`; returns its body.
fn readyz_becomes(address: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, body) = http_get(address, "/readyz");
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {got}: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn metrics_count_every_call_and_name_no_volume() {
    bounded(async {
        // One address for both: one listener serves /healthz, /readyz and /metrics.
        let h = Harness::start(&[
            "--log-format",
            "json",
            "--metrics-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .await;
        let address = wait_for_address(&h, "/healthz /readyz /metrics");
        assert!(address.starts_with("127.0.0.1:"), "{address}");
        let (status, before) = http_get(&address, "/metrics");
        assert_eq!(status, 200, "{before}");
        let before = samples(&before);

        let mut c = h.controller().await;
        let a = create_volume(&mut c, "metrics-a", 1 << 20).await.volume_id;
        let b = create_volume(&mut c, "metrics-b", 1 << 20).await.volume_id;
        let mut conflict = create_req("metrics-a", 8 << 20);
        conflict.capacity_range.as_mut().unwrap().limit_bytes = 8 << 20;
        assert_eq!(code(c.create_volume(conflict).await), Code::AlreadyExists);
        assert_eq!(
            code(
                c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: a.clone(),
                    node_id: "node-a".into(),
                    ..Default::default()
                })
                .await
            ),
            Code::Unimplemented
        );
        assert!(probe_ready(&h).await);

        let (_, mid) = http_get(&address, "/metrics");
        assert!(
            !mid.contains(&a) && !mid.contains(&b),
            "a volume id in /metrics:\n{mid}"
        );
        assert!(
            !mid.contains("metrics-a"),
            "a volume name in /metrics:\n{mid}"
        );
        let mid = samples(&mid);
        let volumes = |s: &_| {
            sample(
                s,
                "stowage_volumes",
                &[("pool", "default"), ("kind", "dir")],
            )
        };
        assert_eq!(volumes(&mid), volumes(&before) + 2.0);

        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: a.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: b.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let (_, after) = http_get(&address, "/metrics");
        let after = samples(&after);

        let delta = |name: &str, labels: &[(&str, &str)]| {
            sample(&after, name, labels) - sample(&before, name, labels)
        };
        let calls = |method: &str, code: &str| {
            delta(
                "stowage_rpc_requests_total",
                &[("method", method), ("code", code)],
            )
        };
        assert_eq!(calls("CreateVolume", "OK"), 2.0);
        assert_eq!(calls("CreateVolume", "AlreadyExists"), 1.0);
        assert_eq!(calls("DeleteVolume", "OK"), 2.0);
        assert_eq!(calls("ControllerPublishVolume", "Unimplemented"), 1.0);
        assert_eq!(calls("Probe", "OK"), 1.0);
        let count =
            |method: &str| delta("stowage_rpc_duration_seconds_count", &[("method", method)]);
        assert_eq!(count("CreateVolume"), 3.0);
        assert_eq!(count("DeleteVolume"), 2.0);
        assert_eq!(count("ControllerPublishVolume"), 1.0);
        // Every call is in the +Inf bucket and the sum grew.
        assert_eq!(
            delta(
                "stowage_rpc_duration_seconds_bucket",
                &[("method", "CreateVolume"), ("le", "+Inf")]
            ),
            3.0
        );
        assert!(
            delta(
                "stowage_rpc_duration_seconds_sum",
                &[("method", "CreateVolume")]
            ) > 0.0
        );
        // Each create and delete waited for a group commit of the store.
        assert!(
            delta(
                "stowage_group_commit_batch_writes_count",
                &[("log", "store")]
            ) >= 1.0,
            "no group commit counted"
        );
        assert_eq!(volumes(&after), volumes(&before));
        assert_eq!(
            sample(&after, "stowage_reconcile_state", &[("state", "done")]),
            1.0
        );
        assert_eq!(
            sample(&after, "stowage_reconcile_state", &[("state", "running")]),
            0.0
        );
        assert_eq!(sample(&after, "stowage_ready", &[]), 1.0);
        assert_eq!(
            sample(&after, "stowage_intents_pending", &[("record", "volume")]),
            0.0
        );
        assert!(
            sample(
                &after,
                "stowage_pool_capacity_bytes",
                &[("pool", "default"), ("kind", "dir")]
            ) > 0.0
        );
        assert!(sample(&after, "process_resident_memory_bytes", &[]) > 0.0);
        assert!(sample(&after, "process_open_fds", &[]) > 0.0);
        assert!(sample(&after, "process_start_time_seconds", &[]) > 1.0e9);

        let (status, body) = http_get(&address, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert_eq!(http_get(&address, "/nothing").0, 404);
    })
    .await
}

/// Makes a directory unwritable for this process until dropped: a read-only bind mount of
/// itself where this test is root (root writes through any mode), mode 0555 otherwise.
struct Unwritable {
    dir: PathBuf,
    mounted: bool,
}

impl Unwritable {
    fn new(dir: &Path, root: bool) -> Unwritable {
        let run = |args: &[&str]| {
            let ok = Command::new(args[0])
                .args(&args[1..])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "{args:?} failed");
        };
        let d = dir.to_str().unwrap();
        if root {
            let guard = Unwritable {
                dir: dir.to_owned(),
                mounted: true,
            };
            run(&["mount", "--bind", d, d]);
            run(&["mount", "-o", "remount,bind,ro", d]);
            guard
        } else {
            run(&["chmod", "0555", d]);
            Unwritable {
                dir: dir.to_owned(),
                mounted: false,
            }
        }
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        } else {
            let _ = Command::new("chmod").arg("0755").arg(&self.dir).status();
        }
    }
}

#[tokio::test]
async fn readyz_and_probe_agree_about_pools() {
    bounded(async {
        let h = Harness::start(&["--log-format", "json", "--health-address", "127.0.0.1:0"]).await;
        let address = wait_for_address(&h, "/healthz /readyz");
        assert_eq!(readyz_becomes(&address, 200), "ready\n");
        assert!(probe_ready(&h).await);
        // Health only: no metrics on this listener.
        assert_eq!(http_get(&address, "/metrics").0, 404);

        // The pool's directory gone: not ready; back: ready again.
        let volumes = h.pool_volumes();
        let aside = volumes.with_file_name("volumes-aside");
        std::fs::rename(&volumes, &aside).unwrap();
        let body = readyz_becomes(&address, 503);
        assert!(body.contains("pool \"default\" is not reachable"), "{body}");
        assert!(!probe_ready(&h).await, "Probe ready while /readyz is 503");
        assert_eq!(http_get(&address, "/healthz").0, 200, "alive all the same");
        std::fs::rename(&aside, &volumes).unwrap();
        readyz_becomes(&address, 200);
        assert!(probe_ready(&h).await);

        // Not writable: not ready.
        {
            let root = std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
            let _ro = Unwritable::new(&volumes, root);
            let body = readyz_becomes(&address, 503);
            assert!(body.contains("pool \"default\""), "{body}");
            assert!(!probe_ready(&h).await);
        }
        readyz_becomes(&address, 200);
        assert!(probe_ready(&h).await);
    })
    .await
}

#[tokio::test]
async fn not_ready_until_reconciled() {
    bounded(async {
        // Started by hand: the harness waits for Probe to say ready, which is what this test
        // holds back (STOWAGE_TEST_HOLD_RECONCILE).
        let mut h = Harness::start(&[]).await;
        h.stop();
        let hold = h.dir.path().join("hold");
        std::fs::write(&hold, "").unwrap();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&h.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["serve", "--endpoint", &h.endpoint, "--node-id", "node-a"])
            .arg("--state-dir")
            .arg(h.state_dir())
            .arg("--kubelet-dir")
            .arg(h.kubelet())
            .args([
                "--log-format",
                "json",
                "--health-address",
                "127.0.0.1:0",
                "--metrics-address",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .env("STOWAGE_TEST_HOLD_RECONCILE", &hold)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        h.child = Some(child);
        let address = wait_for_address(&h, "/healthz /readyz /metrics");
        assert_eq!(http_get(&address, "/healthz").0, 200);
        let body = readyz_becomes(&address, 503);
        assert!(body.contains("reconciliation is not done"), "{body}");
        // The socket is bound before reconciliation starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(h.endpoint.trim_start_matches("unix://")).exists() {
            assert!(Instant::now() < deadline, "no socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!probe_ready(&h).await, "Probe ready before reconciliation");
        let (_, metrics) = http_get(&address, "/metrics");
        let s = samples(&metrics);
        assert_eq!(
            sample(&s, "stowage_reconcile_state", &[("state", "running")]),
            1.0
        );
        assert_eq!(sample(&s, "stowage_ready", &[]), 0.0);

        std::fs::remove_file(&hold).unwrap();
        assert_eq!(readyz_becomes(&address, 200), "ready\n");
        assert!(probe_ready(&h).await);
        let (_, metrics) = http_get(&address, "/metrics");
        let s = samples(&metrics);
        assert_eq!(
            sample(&s, "stowage_reconcile_state", &[("state", "done")]),
            1.0
        );
        assert_eq!(h.stop().code(), Some(0));
    })
    .await
}

/// Loop devices backed by a file in `dir` (`losetup -j` on each), for the cleanup.
fn loops_backed_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(out) = Command::new("losetup").arg("-j").arg(entry.path()).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((dev, _)) = line.split_once(':') {
                found.push(dev.to_owned());
            }
        }
    }
    found
}

/// An image pool's driver; on drop, after the driver and its mounts are gone, detaches any
/// loop device still backed by one of the pool's images.
struct ImageDriver {
    h: Option<Harness>,
    images: PathBuf,
    _root: tempfile::TempDir,
}

impl Drop for ImageDriver {
    fn drop(&mut self) {
        drop(self.h.take());
        for dev in loops_backed_in(&self.images) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

#[tokio::test]
async fn image_pool_loop_devices_are_counted() {
    let test = "image_pool_loop_devices_are_counted";
    if !root_or_skip(test) {
        return;
    }
    if !Path::new("/dev/loop-control").exists() {
        loud!("SKIPPED (no /dev/loop-control): {test}");
        return;
    }
    bounded(async {
        let root = tempfile::Builder::new().prefix("stowage-obs-img-").tempdir().unwrap();
        let config = root.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[[pool]]\nname = \"img\"\nkind = \"image\"\npath = \"{}\"\ndefault_size = \"16Mi\"\n",
                root.path().join("pool").display()
            ),
        )
        .unwrap();
        let h = Harness::start(&[
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
            "--metrics-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .await;
        let d = ImageDriver {
            h: Some(h),
            images: root.path().join("pool/images"),
            _root: root,
        };
        let h = d.h.as_ref().unwrap();
        let address = wait_for_address(h, "/healthz /readyz /metrics");
        assert_eq!(readyz_becomes(&address, 200), "ready\n");
        let loops = || {
            let (_, text) = http_get(&address, "/metrics");
            let s = samples(&text);
            (
                sample(&s, "stowage_pool_loop_devices", &[("pool", "img"), ("kind", "image")]),
                sample(&s, "stowage_volumes", &[("pool", "img"), ("kind", "image")]),
            )
        };
        assert_eq!(loops(), (0.0, 0.0));

        let mut c = h.controller().await;
        let mut req = create_req("obs-raw", 8 << 20);
        req.volume_capabilities = vec![block_cap()];
        let id = c.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_id;
        let staging = h.kubelet().join("staging-obs-raw");
        let stage = csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        };
        let mut n = h.node().await;
        n.node_stage_volume(stage).await.unwrap();
        assert_eq!(loops(), (1.0, 1.0), "one staged block volume, one loop device");
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        assert_eq!(loops(), (0.0, 1.0), "detached at unstage");
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(loops(), (0.0, 0.0));
    })
    .await
}
