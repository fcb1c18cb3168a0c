//! The Kubernetes manifests under `deploy/kubernetes`: valid against the schemas of fixed
//! Kubernetes versions (`scripts/validate-manifests`), refusing a broken copy, and naming the
//! driver and topology key that the real binary reports.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bounded, Harness, DRIVER};
use stowage_csi::v1 as csi;

/// The topology key stowage derives from its driver name.
const TOPOLOGY_KEY: &str = "stowage.csi.dev/node";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn manifest(name: &str) -> String {
    let path = repo_root().join("deploy/kubernetes").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Says that a check did not run, on the real stderr: libtest captures `eprintln!` of a
/// passing test, and a skip must not pass unnoticed.
fn skipped(why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (no python3): manifest schema validation: {why}"
    );
}

fn has_python3() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the validation script, on `dir` when given. `None` when this machine cannot validate.
fn validate(dir: Option<&Path>) -> Option<Output> {
    if !has_python3() {
        skipped("python3 is not on PATH");
        return None;
    }
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/validate-manifests"));
    if let Some(dir) = dir {
        cmd.arg(dir);
    }
    let out = cmd.output().expect("running scripts/validate-manifests");
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

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let Some(out) = validate(None) else { return };
    assert!(out.status.success(), "validation failed:\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Proof that objects were really checked, not just that the script exited 0.
    assert!(
        stdout.contains("valid against Kubernetes") && stdout.contains("schema checks"),
        "no validation summary:\n{}",
        text(&out)
    );
    let _ = writeln!(std::io::stderr(), "{}", stdout.trim());
}

#[test]
fn a_broken_manifest_is_refused() {
    let copy = tempfile::tempdir().expect("tempdir");
    let src = repo_root().join("deploy/kubernetes");
    for entry in std::fs::read_dir(&src).expect("deploy/kubernetes") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copy");
    }
    // A misspelt field: only a strict schema check notices.
    let csidriver = manifest("csidriver.yaml").replace(
        "attachRequired: false",
        "attachRequired: false\n  attachRequird: true",
    );
    std::fs::write(copy.path().join("csidriver.yaml"), csidriver).expect("write");
    let Some(out) = validate(Some(copy.path())) else {
        return;
    };
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("attachRequird"),
        "{}",
        text(&out)
    );
}

/// The value of `--flag=value` in the argument lists of a manifest.
fn arg_value<'a>(yaml: &'a str, flag: &str) -> Vec<&'a str> {
    let prefix = format!("- {flag}=");
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim().trim_matches('"'))
        .collect()
}

/// The value of `key: value` lines of a manifest (comments ignored).
fn field_values<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    yaml.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix(&prefix))
        .map(|v| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
        .collect()
}

#[test]
fn manifests_name_the_driver_and_topology_key_of_the_code() {
    let daemonset = manifest("daemonset.yaml");
    assert_eq!(arg_value(&daemonset, "--driver-name"), [DRIVER]);
    assert_eq!(arg_value(&daemonset, "--mode"), ["all"]);
    assert_eq!(arg_value(&daemonset, "--node-id"), ["$(NODE_NAME)"]);
    assert_eq!(
        arg_value(&daemonset, "--endpoint"),
        ["unix:///csi/csi.sock"]
    );
    let plugin_dir = format!("/var/lib/kubelet/plugins/{DRIVER}");
    assert_eq!(
        arg_value(&daemonset, "--kubelet-registration-path"),
        [format!("{plugin_dir}/csi.sock")]
    );
    assert!(
        field_values(&daemonset, "path").contains(&plugin_dir.as_str()),
        "no hostPath volume for {plugin_dir}"
    );
    assert_eq!(
        field_values(&daemonset, &format!("{DRIVER}/topology-key")),
        [TOPOLOGY_KEY]
    );
    assert!(arg_value(&daemonset, "--node-deployment").contains(&"true"));
    assert!(arg_value(&daemonset, "--enable-capacity").contains(&"true"));
    assert!(arg_value(&daemonset, "--extra-create-metadata").contains(&"true"));

    let csidriver = manifest("csidriver.yaml");
    assert_eq!(field_values(&csidriver, "name"), [DRIVER]);
    let storageclass = manifest("storageclass.yaml");
    assert_eq!(field_values(&storageclass, "provisioner"), [DRIVER]);
    assert_eq!(
        field_values(&storageclass, "volumeBindingMode"),
        ["WaitForFirstConsumer"]
    );
}

#[tokio::test]
async fn the_binary_reports_what_the_manifests_say() {
    let daemonset = manifest("daemonset.yaml");
    let driver = arg_value(&daemonset, "--driver-name")[0].to_owned();
    let key = field_values(&daemonset, &format!("{DRIVER}/topology-key"))[0].to_owned();
    bounded(async move {
        let h = Harness::start(&["--driver-name", &driver]).await;
        let info = h
            .identity()
            .await
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
        assert_eq!(info.name, driver);
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
