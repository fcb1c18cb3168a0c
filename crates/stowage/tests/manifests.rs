//! The Kubernetes manifests under `deploy/kubernetes`: every overlay renders and is valid
//! against the schemas of fixed Kubernetes versions (`scripts/validate-manifests`), a broken
//! copy is refused, and the rendered objects agree with the real binary — the flags the
//! DaemonSet passes exist, the CSIDriver object and the sidecars present match the
//! capabilities `stowage serve` advertises (asked with `stowage ctl … caps -o json`), and
//! the sidecars run in the mode the deployment needs.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bounded, Harness, DRIVER};
use serde_json::Value;
use stowage_csi::v1 as csi;

/// The topology key stowage derives from its driver name.
const TOPOLOGY_KEY: &str = "stowage.csi.dev/node";

/// The overlays an operator chooses from, one per pool kind.
const OVERLAYS: [&str; 3] = ["dir", "image", "btrfs"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Says that a check did not run, on the real stderr: libtest captures `eprintln!` of a
/// passing test, and a skip must not pass unnoticed.
fn skipped(why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (no python3): manifest validation: {why}"
    );
}

fn has_python3() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the validation script with `args`. `None` when this machine cannot validate.
fn run_script(args: &[&Path]) -> Option<Output> {
    if !has_python3() {
        skipped("python3 is not on PATH");
        return None;
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/validate-manifests"))
        .args(args)
        .output()
        .expect("running scripts/validate-manifests");
    if out.status.code() == Some(3) {
        skipped(String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    Some(out)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The objects of an overlay as the script renders them (the same as `kubectl kustomize`:
/// the validation checks that wherever kubectl is present).
fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = repo_root().join("deploy/kubernetes/overlays").join(overlay);
    let out = run_script(&[Path::new("--render"), &dir])?;
    assert!(out.status.success(), "rendering {overlay}:\n{}", text(&out));
    let objects: Value = serde_json::from_slice(&out.stdout).expect("rendered JSON");
    Some(objects.as_array().expect("a list").clone())
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn containers(daemonset: &Value) -> &Vec<Value> {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
}

fn container<'a>(daemonset: &'a Value, name: &str) -> Option<&'a Value> {
    containers(daemonset).iter().find(|c| c["name"] == name)
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// The values of `--flag=value` in a container's arguments.
fn arg_values(c: &Value, flag: &str) -> Vec<String> {
    let prefix = format!("{flag}=");
    args(c)
        .iter()
        .filter_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// The downward-API field an environment variable of a container comes from.
fn env_field(c: &Value, name: &str) -> Option<String> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .map(str::to_owned)
}

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let Some(out) = run_script(&[]) else { return };
    assert!(out.status.success(), "validation failed:\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Proof that objects were really checked, not just that the script exited 0.
    assert!(
        stdout.contains("valid against Kubernetes 1.30.0")
            && stdout.contains("schema checks")
            && OVERLAYS.iter().all(|o| stdout.contains(o)),
        "no validation summary:\n{}",
        text(&out)
    );
    let _ = writeln!(std::io::stderr(), "{}", stdout.trim());
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let before = std::fs::read_to_string(path).expect("read");
    assert!(before.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, before.replacen(from, to, 1)).expect("write");
}

#[test]
fn a_broken_manifest_is_refused() {
    let copy = tempfile::tempdir().expect("tempdir");
    let root = copy.path().join("kubernetes");
    copy_tree(&repo_root().join("deploy/kubernetes"), &root);
    // A misspelt field: only a strict schema check notices.
    edit(
        &root.join("base/csidriver.yaml"),
        "attachRequired: false",
        "attachRequired: false\n  attachRequird: true",
    );
    // The CRD kubernetes-validate has no schema for: our own check.
    edit(
        &root.join("base/volumesnapshotclass.yaml"),
        "deletionPolicy: Delete",
        "deletionPolicy: Remove",
    );
    // Propagation on the state dir (what failed on nodes whose / is a private mount).
    edit(
        &root.join("base/daemonset.yaml"),
        "              mountPath: /var/lib/stowage\n",
        "              mountPath: /var/lib/stowage\n              mountPropagation: HostToContainer\n",
    );
    // A pool outside every hostPath the driver mounts.
    edit(
        &root.join("overlays/image/configmap.yaml"),
        "path = \"/var/lib/stowage/pools/image\"",
        "path = \"/mnt/images\"",
    );
    // A kustomization key the renderer does not understand is refused, never ignored.
    let k = root.join("overlays/btrfs/kustomization.yaml");
    let mut text_k = std::fs::read_to_string(&k).unwrap();
    text_k.push_str("namePrefix: x-\n");
    std::fs::write(&k, text_k).unwrap();
    let Some(out) = run_script(&[&root]) else {
        return;
    };
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "attachRequird",
        "deletionPolicy must be Delete or Retain",
        "mountPropagation HostToContainer",
        "pool image at /mnt/images is not under a hostPath",
        "['namePrefix'] are not understood",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing:\n{}",
            text(&out)
        );
    }
}

/// `stowage ctl -o json <service> caps` against a running driver: the capability names.
fn caps(h: &Harness, service: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args([
            "ctl",
            "--endpoint",
            &h.endpoint,
            "-o",
            "json",
            service,
            "caps",
        ])
        .output()
        .expect("stowage ctl");
    assert!(out.status.success(), "ctl {service} caps:\n{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("caps JSON");
    v["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| c.as_str().expect("a name").to_owned())
        .collect()
}

/// The long flags `stowage serve --help` lists.
fn serve_flags() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["serve", "--help"])
        .output()
        .expect("stowage serve --help");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_owned())
        .collect()
}

/// Arguments the test gives itself (temporary paths) instead of the DaemonSet's.
const PER_RUN: [&str; 5] = [
    "--endpoint",
    "--state-dir",
    "--node-id",
    "--kubelet-dir",
    "--config",
];

#[tokio::test]
async fn every_overlay_matches_what_the_binary_advertises() {
    let flags = serve_flags();
    let docs = std::fs::read_to_string(repo_root().join("docs/kubernetes.md"))
        .expect("docs/kubernetes.md");
    for overlay in OVERLAYS {
        let Some(objects) = render(overlay) else {
            return;
        };
        let ds = only(&objects, "DaemonSet");
        let driver = container(ds, "stowage").expect("the stowage container");
        let driver_args = args(driver);
        assert_eq!(driver_args.first().map(String::as_str), Some("serve"));

        // Every flag exists in `stowage serve --help`.
        for a in &driver_args[1..] {
            let flag = a.split('=').next().unwrap();
            assert!(
                flags.contains(flag),
                "{overlay}: {flag} is not a flag of `stowage serve` ({flags:?})"
            );
        }

        // The pool configuration is one the binary accepts.
        let config_map = find(&objects, "ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"] == "stowage-config")
            .expect("ConfigMap stowage-config");
        let toml = config_map["data"]["config.toml"]
            .as_str()
            .expect("config.toml");
        let config = stowage_core::config::Config::from_toml(toml)
            .unwrap_or_else(|e| panic!("{overlay}: config.toml: {e}"));
        config.check().expect("config check");
        assert_eq!(
            config.pools[0].kind.as_str(),
            overlay,
            "{overlay}: pool kind"
        );

        // Start the binary with the DaemonSet's own arguments (paths made temporary), and
        // with the overlay's pools where this machine can open them.
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut run_args: Vec<String> = driver_args[1..]
            .iter()
            .filter(|a| !PER_RUN.contains(&a.split('=').next().unwrap()))
            .cloned()
            .collect();
        if overlay != "btrfs" {
            let rewritten = toml.replace("/var/lib/stowage", &tmp.path().display().to_string());
            let path = tmp.path().join("config.toml");
            std::fs::write(&path, rewritten).unwrap();
            run_args.push(format!("--config={}", path.display()));
        }
        // The HTTP endpoints on a free loopback port instead of the pod's fixed ones.
        run_args
            .retain(|a| !a.starts_with("--health-address") && !a.starts_with("--metrics-address"));
        run_args.push("--health-address=127.0.0.1:0".into());
        let run_refs: Vec<&str> = run_args.iter().map(String::as_str).collect();
        let h = Harness::start(&run_refs).await;
        let identity = caps(&h, "identity");
        let controller = caps(&h, "controller");
        let node = caps(&h, "node");
        let info = h
            .identity()
            .await
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();

        // One driver name everywhere.
        let csidriver = only(&objects, "CSIDriver");
        let spec = &csidriver["spec"];
        assert_eq!(csidriver["metadata"]["name"], info.name.as_str());
        for sc in find(&objects, "StorageClass") {
            assert_eq!(sc["provisioner"], info.name.as_str(), "{overlay}");
            assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer");
            let pool = sc["parameters"]["pool"].as_str().expect("pool parameter");
            assert!(
                config.pools.iter().any(|p| p.name == pool),
                "{overlay}: StorageClass pool {pool} is not configured"
            );
            // Expansion offered by the class ⇔ by the driver (online, as kubelet does it).
            assert_eq!(
                sc["allowVolumeExpansion"] == true,
                identity.contains("VOLUME_EXPANSION_ONLINE"),
                "{overlay}: allowVolumeExpansion vs {identity:?}"
            );
        }
        for vsc in find(&objects, "VolumeSnapshotClass") {
            assert_eq!(vsc["driver"], info.name.as_str());
            assert_eq!(vsc["deletionPolicy"], "Delete");
        }

        // The CSIDriver object against the capabilities.
        assert_eq!(
            spec["attachRequired"] == true,
            controller.contains("PUBLISH_UNPUBLISH_VOLUME"),
            "{overlay}: attachRequired vs {controller:?}"
        );
        assert_eq!(
            spec["storageCapacity"] == true,
            controller.contains("GET_CAPACITY"),
            "{overlay}: storageCapacity vs {controller:?}"
        );
        // With VOLUME_MOUNT_GROUP and fsGroupPolicy File, the kubelet hands the pod's
        // fsGroup to the driver (volume_mount_group) instead of changing ownership itself.
        assert!(
            node.contains("VOLUME_MOUNT_GROUP"),
            "{node:?}: the driver no longer applies fsGroup; revisit fsGroupPolicy"
        );
        assert_eq!(spec["fsGroupPolicy"], "File");
        assert_eq!(spec["requiresRepublish"], false);
        assert_eq!(spec["podInfoOnMount"], true);
        // Persistent volumes and CSI ephemeral inline volumes.
        assert_eq!(
            spec["volumeLifecycleModes"],
            serde_json::json!(["Persistent", "Ephemeral"])
        );

        // Sidecars present exactly when the driver can serve them.
        let provisioner = container(ds, "csi-provisioner").expect("csi-provisioner");
        assert!(controller.contains("CREATE_DELETE_VOLUME"));
        assert_eq!(
            container(ds, "csi-snapshotter").is_some(),
            controller.contains("CREATE_DELETE_SNAPSHOT"),
            "{overlay}: csi-snapshotter vs {controller:?}"
        );
        let controller_expansion = controller.contains("EXPAND_VOLUME");
        let node_only_expansion = node.contains("EXPAND_VOLUME")
            && arg_values(driver, "--controller-expansion") == ["false"];
        assert_eq!(
            container(ds, "csi-resizer").is_some(),
            controller_expansion || node_only_expansion,
            "{overlay}: csi-resizer vs {controller:?} {node:?}"
        );
        assert!(container(ds, "node-driver-registrar").is_some());
        // No livenessprobe sidecar: it fails liveness when Probe says not ready, and Probe
        // says so for an unwritable pool, which a restart does not fix (see the probes below).
        assert!(container(ds, "liveness-probe").is_none(), "{overlay}");

        // The mode: every node provisions (and snapshots) its own volumes, so a resizer that
        // would call ControllerExpandVolume on some other node's driver must not.
        assert_eq!(arg_values(provisioner, "--node-deployment"), ["true"]);
        assert_eq!(arg_values(provisioner, "--enable-capacity"), ["true"]);
        assert_eq!(arg_values(provisioner, "--capacity-ownerref-level"), ["1"]);
        assert_eq!(arg_values(provisioner, "--extra-create-metadata"), ["true"]);
        assert_eq!(
            arg_values(provisioner, "--strict-topology"),
            ["true"],
            "{overlay}"
        );
        assert!(identity.contains("VOLUME_ACCESSIBILITY_CONSTRAINTS"));
        for (var, field) in [
            ("NODE_NAME", "spec.nodeName"),
            ("NAMESPACE", "metadata.namespace"),
            ("POD_NAME", "metadata.name"),
        ] {
            assert_eq!(env_field(provisioner, var).as_deref(), Some(field), "{var}");
        }
        if let Some(snapshotter) = container(ds, "csi-snapshotter") {
            assert_eq!(arg_values(snapshotter, "--node-deployment"), ["true"]);
            assert!(arg_values(snapshotter, "--leader-election").is_empty());
            assert_eq!(
                env_field(snapshotter, "NODE_NAME").as_deref(),
                Some("spec.nodeName")
            );
        }
        if let Some(resizer) = container(ds, "csi-resizer") {
            assert!(
                !controller_expansion,
                "{overlay}: per-node controllers with ControllerExpandVolume: the resizer \
                 would reach a driver that does not have the volume"
            );
            assert_eq!(arg_values(resizer, "--leader-election"), ["true"]);
            assert_eq!(
                arg_values(resizer, "--leader-election-namespace"),
                ["$(NAMESPACE)"]
            );
            assert_eq!(
                env_field(resizer, "NAMESPACE").as_deref(),
                Some("metadata.namespace")
            );
        }

        // The driver's probes are its own endpoints: liveness /healthz, readiness /readyz,
        // on the named port of --health-address, bound where kubelet reaches it (the pod's
        // address, not loopback); /metrics on the named port of --metrics-address.
        let port_of = |flag: &str| -> u64 {
            let address = arg_values(driver, flag);
            assert_eq!(address.len(), 1, "{overlay}: {flag}");
            let (host, port) = address[0].rsplit_once(':').expect("host:port");
            assert!(
                !host.is_empty() && !host.starts_with("127.") && host != "localhost",
                "{overlay}: {flag}={} is not reachable from kubelet",
                address[0]
            );
            port.parse().expect("port")
        };
        let named_port = |name: &Value| -> Value {
            driver["ports"]
                .as_array()
                .expect("driver ports")
                .iter()
                .find(|p| &p["name"] == name)
                .unwrap_or_else(|| panic!("{overlay}: no port named {name}"))["containerPort"]
                .clone()
        };
        let health = port_of("--health-address");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &driver[probe]["httpGet"];
            assert_eq!(get["path"], path, "{overlay}: {probe}");
            assert_eq!(named_port(&get["port"]), health, "{overlay}: {probe} port");
        }
        assert_eq!(
            named_port(&Value::from("metrics")),
            port_of("--metrics-address"),
            "{overlay}: metrics port"
        );

        // Every socket path is the plugin directory kubelet knows the driver by.
        let plugin_dir = format!("/var/lib/kubelet/plugins/{DRIVER}");
        assert_eq!(
            arg_values(
                container(ds, "node-driver-registrar").unwrap(),
                "--kubelet-registration-path"
            ),
            [format!("{plugin_dir}/csi.sock")]
        );
        for c in containers(ds) {
            if c["name"] != "stowage" {
                assert_eq!(
                    arg_values(c, "--csi-address"),
                    ["/csi/csi.sock"],
                    "{}",
                    c["name"]
                );
            }
        }
        assert_eq!(arg_values(driver, "--endpoint"), ["unix:///csi/csi.sock"]);

        // Sidecar images pinned to a release, and the documentation names the same ones.
        for c in containers(ds) {
            let image = c["image"].as_str().expect("image");
            if c["name"] == "stowage" {
                continue;
            }
            let (name, tag) = image.rsplit_once(':').expect("a tag");
            assert!(name.starts_with("registry.k8s.io/sig-storage/"), "{image}");
            let version = tag.strip_prefix('v').unwrap_or("");
            assert!(
                version.split('.').count() == 3
                    && version.split('.').all(|p| p.parse::<u32>().is_ok()),
                "{image} is not pinned to a release"
            );
            assert!(
                docs.contains(image),
                "docs/kubernetes.md does not name {image}"
            );
        }
        drop(h);
    }
}

#[tokio::test]
async fn the_binary_reports_the_topology_key_of_the_manifests() {
    let Some(objects) = render("dir") else { return };
    let ds = only(&objects, "DaemonSet");
    let driver = container(ds, "stowage").expect("the stowage container");
    let name = arg_values(driver, "--driver-name")[0].clone();
    assert_eq!(name, DRIVER);
    assert_eq!(arg_values(driver, "--node-id"), ["$(NODE_NAME)"]);
    assert_eq!(
        env_field(driver, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    let key = ds["spec"]["template"]["metadata"]["annotations"][format!("{DRIVER}/topology-key")]
        .as_str()
        .expect("topology-key annotation")
        .to_owned();
    bounded(async move {
        let h = Harness::start(&["--driver-name", &name]).await;
        let node = h
            .node()
            .await
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        let segments = node.accessible_topology.expect("topology").segments;
        let keys: Vec<&String> = segments.keys().collect();
        assert_eq!(keys, [&key]);
        assert_eq!(key, TOPOLOGY_KEY);
        assert_eq!(segments[&key], node.node_id);
    })
    .await
}
