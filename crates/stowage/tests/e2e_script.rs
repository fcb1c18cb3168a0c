//! `scripts/e2e`, the check an operator runs against a live cluster, tested without one: it
//! parses (and passes shellcheck where installed), a dry run never calls kubectl and
//! changes nothing outside its own namespace and StorageClass (the driver pod it restarts
//! aside), and a namespace that exists already is refused and left alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NS: &str = "e2e-dry";
const STEPS: [&str; 9] = [
    "setup",
    "provision+write+read",
    "write-past-size-fails",
    "driver-restart-under-pod",
    "snapshot+restore",
    "clone",
    "online-expansion",
    "raw-block",
    "deletion-leaves-nothing",
];
/// kubectl verbs that change the cluster.
const MUTATING: [&str; 9] = [
    "apply", "create", "delete", "patch", "label", "annotate", "replace", "scale", "edit",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/e2e")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fake kubectl in `dir` that appends its arguments to `dir/calls` and exits `status`.
fn fake_kubectl(dir: &Path, status: i32) -> PathBuf {
    let path = dir.join("kubectl");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexit {status}\n",
            dir.join("calls").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn calls(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
}

#[test]
fn the_script_parses_and_passes_shellcheck() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(script())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    match Command::new("shellcheck").arg(script()).output() {
        Ok(out) => assert!(out.status.success(), "{}", text(&out)),
        Err(_) => {
            // The summary of scripts/test counts this line as a skip (.ci/run installs it).
            println!(
                "SKIPPED (shellcheck is not installed; .ci/run installs it): the_script_parses_and_passes_shellcheck"
            );
        }
    }
}

/// The calls a dry run prints: (arguments, the manifest fed to `apply -f -`).
fn printed_calls(stdout: &str) -> Vec<(Vec<String>, String)> {
    let mut found: Vec<(Vec<String>, String)> = Vec::new();
    for line in stdout.lines() {
        let line = line.trim_start();
        if let Some(rest) = line.strip_prefix("kubectl ") {
            found.push((
                rest.split_whitespace().map(str::to_owned).collect(),
                String::new(),
            ));
        } else if let Some(doc) = line.strip_prefix("| ").or(line.strip_prefix('|')) {
            let last = found.last_mut().expect("a manifest follows its call");
            last.1.push_str(doc);
            last.1.push('\n');
        }
    }
    found
}

fn namespace_of(args: &[String]) -> Option<&str> {
    args.iter()
        .position(|a| a == "-n" || a == "--namespace")
        .map(|i| args[i + 1].as_str())
}

fn verb(args: &[String]) -> &str {
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-n" || args[i] == "--namespace" {
            i += 2;
        } else {
            return &args[i];
        }
    }
    ""
}

#[test]
fn a_dry_run_calls_no_kubectl_and_stays_in_its_namespace() {
    for pool in ["dir", "image", "btrfs"] {
        let fake = tempfile::tempdir().unwrap();
        fake_kubectl(fake.path(), 1);
        let path = format!(
            "{}:{}",
            fake.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(script())
            .args(["--dry-run", "--pool", pool, "--namespace", NS])
            .env("PATH", path)
            .env_remove("KUBECTL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{pool}: {}", text(&out));
        assert_eq!(calls(fake.path()), "", "{pool}: kubectl was called");
        let stdout = String::from_utf8_lossy(&out.stdout);
        for step in STEPS {
            let expected = if step == "raw-block" && pool != "image" {
                "SKIP"
            } else {
                "PASS"
            };
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(expected) && l.split_whitespace().nth(1) == Some(step)),
                "{pool}: no {expected} line for {step}:\n{stdout}"
            );
        }
        let storage_class = format!("stowage-e2e-{NS}");
        let all = printed_calls(&stdout);
        assert!(!all.is_empty());
        for (args, manifest) in &all {
            let v = verb(args);
            if !MUTATING.contains(&v) {
                continue;
            }
            let shown = args.join(" ");
            match namespace_of(args) {
                Some(ns) if ns == NS => {
                    assert!(
                        !manifest.contains("namespace:"),
                        "{pool}: a manifest naming a namespace: {manifest}"
                    );
                }
                // The one thing outside: the driver pod on the writer's node, restarted.
                Some("stowage") => assert!(
                    v == "delete" && args.contains(&"pod".to_owned()),
                    "{pool}: {shown}"
                ),
                Some(other) => panic!("{pool}: a call in namespace {other}: {shown}"),
                None => {
                    let ok = shown == format!("create namespace {NS}")
                        || shown
                            == format!(
                                "label namespace {NS} app.kubernetes.io/created-by=stowage-e2e"
                            )
                        || shown == format!("delete namespace {NS} --wait=false")
                        || shown
                            == format!("delete storageclass {storage_class} --ignore-not-found")
                        || (shown == "apply -f -"
                            && manifest.contains("kind: StorageClass")
                            && manifest.contains(&format!("name: {storage_class}\n")));
                    assert!(ok, "{pool}: a cluster-wide call: {shown}\n{manifest}");
                }
            }
        }
        // Created, then removed at the end.
        let last: Vec<String> = all.iter().rev().take(2).map(|(a, _)| a.join(" ")).collect();
        assert_eq!(
            last,
            [
                format!("delete storageclass {storage_class} --ignore-not-found"),
                format!("delete namespace {NS} --wait=false"),
            ],
            "{pool}"
        );
    }
}

#[test]
fn an_existing_namespace_is_refused_and_left_alone() {
    let fake = tempfile::tempdir().unwrap();
    // Every call succeeds: `get namespace` says it exists.
    let kubectl = fake_kubectl(fake.path(), 0);
    let out = Command::new("bash")
        .arg(script())
        .args(["--namespace", "kube-system", "--timeout", "1"])
        .env("KUBECTL", &kubectl)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL") && stdout.contains("exists already"),
        "{}",
        text(&out)
    );
    let made = calls(fake.path());
    assert!(made.contains("get namespace kube-system"), "{made}");
    for line in made.lines() {
        let v = line.split_whitespace().next().unwrap_or("");
        assert!(
            !MUTATING.contains(&v),
            "changed something in an existing namespace: {line}"
        );
    }
}
