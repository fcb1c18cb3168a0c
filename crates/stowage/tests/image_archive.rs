//! The container image: the OCI archive `scripts/image` writes, unpacked by hand (index.json →
//! manifest → config and layers, every blob checked against its digest), its config
//! (entrypoint, user, labels, name), and the binary and the tools the driver runs executed
//! inside its root filesystem with chroot. And the Dockerfile, which builds the same image with
//! a container engine, checked against the script: suite, package list, entrypoint, labels.
//!
//! The archive is `STOWAGE_IMAGE_ARCHIVE` when set (.ci/run builds the release image and sets
//! it); otherwise this test runs `scripts/image` with the binary cargo built for the tests, so
//! it needs no release build (about 90 s, most of it downloading packages). SKIPPED (saying
//! why) when not root, when mmdebstrap or umoci cannot be installed, or when the Debian
//! mirror is unreachable.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;
use stowage_sys::FsKind;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ENTRYPOINT: &str = "/usr/local/bin/stowage";
/// What the root filesystem's layer may weigh at most, compressed (today 46 MiB).
const MAX_BASE_LAYER_BYTES: u64 = 64 << 20;
/// What the release binary's layer may weigh at most, compressed (today 5 MiB).
const MAX_BINARY_LAYER_BYTES: u64 = 16 << 20;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The package names of deploy/image/packages (comments and blank lines dropped).
fn packages() -> BTreeSet<String> {
    read(&repo().join("deploy/image/packages"))
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

fn suite() -> String {
    read(&repo().join("deploy/image/suite")).trim().to_owned()
}

#[test]
fn dockerfile_and_scripts_image_agree() {
    // The package list is exactly the packages of the programs the driver spawns.
    let wanted: BTreeSet<String> = FsKind::ALL.iter().map(|k| k.package().to_owned()).collect();
    assert_eq!(packages(), wanted, "deploy/image/packages");

    let dockerfile = read(&repo().join("Dockerfile"));
    let script = read(&repo().join("scripts/image"));
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let has = |line: &str| lines.contains(&line);

    // The entrypoint is the binary (the DaemonSet passes only args); no USER (root).
    let entry = format!("ENTRYPOINT [\"{ENTRYPOINT}\"]");
    assert!(has(&entry), "Dockerfile lacks `{entry}`");
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("USER ") || l.starts_with("CMD ")),
        "the Dockerfile sets USER or CMD"
    );
    assert!(
        script.contains(&format!("--config.entrypoint {ENTRYPOINT}")),
        "scripts/image's entrypoint is not {ENTRYPOINT}"
    );
    assert!(
        !script.contains("--config.user"),
        "scripts/image sets a user"
    );

    // Both read the one package list and the one trimming script; neither names a package
    // of its own.
    assert!(
        script.contains("deploy/image/packages") && script.contains("deploy/image/slim"),
        "scripts/image does not read deploy/image/packages and deploy/image/slim"
    );
    assert!(
        dockerfile.contains("COPY deploy/image/packages deploy/image/slim /tmp/image/")
            && dockerfile.contains("$(sed 's/#.*//' /tmp/image/packages)")
            && dockerfile.contains("sh /tmp/image/slim"),
        "the Dockerfile does not install deploy/image/packages and run deploy/image/slim"
    );
    for package in packages() {
        assert!(
            !dockerfile.contains(&package) && !script.contains(&package),
            "{package} is named outside deploy/image/packages"
        );
    }
    assert_eq!(
        dockerfile.matches("apt-get install").count(),
        1,
        "one apt-get install in the Dockerfile"
    );

    // The same Debian release, the build stage's too (the binary's glibc).
    let suite = suite();
    assert!(
        has(&format!("ARG DEBIAN_SUITE={suite}")),
        "Dockerfile suite is not {suite}"
    );
    assert!(has("FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS build"));
    assert!(has("FROM debian:${DEBIAN_SUITE}-slim"));
    assert!(script.contains("deploy/image/suite"));

    // The labels scripts/image sets from Cargo.toml, with the same values.
    assert!(has(&format!("ARG VERSION={VERSION}")), "Dockerfile version");
    for (label, value) in [
        ("title", "stowage"),
        ("description", env!("CARGO_PKG_DESCRIPTION")),
        ("licenses", env!("CARGO_PKG_LICENSE")),
    ] {
        let line = format!("org.opencontainers.image.{label}=\"{value}\"");
        assert!(dockerfile.contains(&line), "Dockerfile lacks {line}");
        assert!(
            script.contains(&format!("org.opencontainers.image.{label}=")),
            "scripts/image lacks the {label} label"
        );
    }
    assert!(dockerfile.contains("org.opencontainers.image.version=\"${VERSION}\""));
    assert!(dockerfile.contains("org.opencontainers.image.source="));
    assert!(script.contains("org.opencontainers.image.source="));

    // The build stage builds what scripts/image does, and the context leaves target/ out.
    assert!(dockerfile.contains("cargo build --release --locked -p stowage"));
    assert!(script.contains("cargo build --release --locked -p stowage"));
    let ignore = read(&repo().join(".dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        ".dockerignore"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The archive to check, built by scripts/image into `dir` unless STOWAGE_IMAGE_ARCHIVE
/// names one; None (after a SKIPPED line) when it cannot be built here.
fn archive(test: &str, dir: &Path) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STOWAGE_IMAGE_ARCHIVE") {
        loud!(
            "{test}: checking STOWAGE_IMAGE_ARCHIVE={}",
            Path::new(&path).display()
        );
        return Some(PathBuf::from(path));
    }
    let out = dir.join("stowage.oci.tar");
    let start = Instant::now();
    let result = Command::new(repo().join("scripts/image"))
        .arg("--out")
        .arg(&out)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_stowage"))
        .arg("--timeout")
        .arg("600")
        .output()
        .expect("scripts/image runs");
    let stderr = String::from_utf8_lossy(&result.stderr);
    let why = |code| match code {
        3 => Some("mmdebstrap or umoci not installable"),
        4 => Some("the Debian mirror is unreachable"),
        _ => None,
    };
    match result.status.code() {
        Some(0) => {
            loud!(
                "{test}: scripts/image built the archive in {:.0} s",
                start.elapsed().as_secs_f64()
            );
            Some(out)
        }
        Some(code) if why(code).is_some() => {
            // scripts/image's last line says why in its own words.
            let last = stderr.lines().last().unwrap_or("");
            let last = last.strip_prefix("image: ").unwrap_or(last);
            loud!("SKIPPED ({}; {last}): {test}", why(code).unwrap());
            None
        }
        _ => panic!(
            "scripts/image failed: {}\n{}{stderr}",
            result.status,
            String::from_utf8_lossy(&result.stdout)
        ),
    }
}

/// Reads a blob of the unpacked layout, checking its size and digest against `desc`.
fn blob(layout: &Path, desc: &Value) -> PathBuf {
    let digest = desc["digest"].as_str().expect("descriptor digest");
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    let size = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("blob {digest}: {e}"))
        .len();
    assert_eq!(Some(size), desc["size"].as_u64(), "size of {digest}");
    assert_eq!(sha256(&path), hex, "digest of {}", path.display());
    path
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `program args…` in the root filesystem with the environment the driver gives its
/// tools (PATH only); its output, whatever its status, unless it could not be run at all.
fn in_rootfs(rootfs: &Path, program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("chroot")
        .arg(rootfs)
        .arg(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C")
        .output()
        .expect("chroot runs");
    let code = out.status.code().unwrap_or(-1);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // chroot's own 125..127: it could not chroot, or the program is missing or not runnable.
    assert!(
        !(125..=127).contains(&code),
        "{program} {args:?} does not run in the image ({code}): {text}"
    );
    (code, text)
}

#[test]
fn image_archive_holds_the_driver_and_the_tools_it_runs() {
    let test = "image_archive_holds_the_driver_and_the_tools_it_runs";
    if !common::root_or_skip(test) {
        return;
    }
    let start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let Some(archive) = archive(test, dir.path()) else {
        return;
    };
    let size = std::fs::metadata(&archive).unwrap().len();

    // The OCI image layout.
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    assert_eq!(
        json(&layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json(&layout.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().expect("index manifests");
    assert_eq!(manifests.len(), 1, "one image: {index}");
    let desc = &manifests[0];
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // The names importers give it: `ctr images import` and `podman load` read containerd's
    // annotation, skopeo the reference name; both are the tag as given.
    let tag = format!("stowage:{VERSION}");
    assert_eq!(
        desc["annotations"]["org.opencontainers.image.ref.name"], *tag,
        "{desc}"
    );
    assert_eq!(
        desc["annotations"]["io.containerd.image.name"], *tag,
        "{desc}"
    );

    let manifest = json(&blob(&layout, desc));
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config = json(&blob(&layout, &manifest["config"]));
    assert_eq!(config["os"], "linux");
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        config["architecture"],
        *String::from_utf8_lossy(&arch.stdout).trim()
    );
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!([ENTRYPOINT]), "{c}");
    assert!(c["Cmd"].is_null(), "no Cmd (the DaemonSet gives args): {c}");
    assert!(
        matches!(c["User"].as_str(), None | Some("" | "root" | "0" | "0:0")),
        "runs as root: {c}"
    );
    let labels = &c["Labels"];
    for (label, value) in [
        ("title", "stowage"),
        ("description", env!("CARGO_PKG_DESCRIPTION")),
        ("licenses", env!("CARGO_PKG_LICENSE")),
        ("version", VERSION),
    ] {
        assert_eq!(
            labels[format!("org.opencontainers.image.{label}")],
            *value,
            "{labels}"
        );
    }

    // The layers, in order, into a root filesystem; each one's uncompressed digest is the
    // config's diff_id.
    let layers = manifest["layers"].as_array().expect("manifest layers");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(layers.len(), diff_ids.len());
    // Small: the Debian layers, and the binary's (the release binary's only: the one cargo
    // builds for tests carries debug information).
    let (binary_layer, base_layers) = layers.split_last().expect("layers");
    let base: u64 = base_layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    assert!(
        base <= MAX_BASE_LAYER_BYTES,
        "the root filesystem weighs {base} bytes compressed, more than {MAX_BASE_LAYER_BYTES}"
    );
    if std::env::var_os("STOWAGE_IMAGE_ARCHIVE").is_some() {
        let binary = binary_layer["size"].as_u64().unwrap_or(0);
        assert!(
            binary <= MAX_BINARY_LAYER_BYTES,
            "the binary's layer weighs {binary} bytes, more than {MAX_BINARY_LAYER_BYTES}"
        );
    }
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let path = blob(&layout, layer);
        let plain = dir.path().join("layer.tar");
        let file = std::fs::File::create(&plain).unwrap();
        let status = Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .stdout(file)
            .status()
            .unwrap();
        assert!(status.success(), "gunzip {}", path.display());
        assert_eq!(
            diff_id.as_str(),
            Some(format!("sha256:{}", sha256(&plain)).as_str())
        );
        let list = run(Command::new("tar").arg("-tf").arg(&plain));
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(
            !list.lines().any(|l| l.contains(".wh.")),
            "a layer with whiteouts"
        );
        run(Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&plain)
            .arg("-C")
            .arg(&rootfs));
        std::fs::remove_file(&plain).unwrap();
    }

    // The binary and every program the driver spawns run in there.
    let (code, text) = in_rootfs(&rootfs, ENTRYPOINT, &["--version"]);
    assert_eq!(
        (code, text.trim()),
        (0, format!("stowage {VERSION}").as_str())
    );
    for (program, args, says) in [
        ("mkfs.ext4", &["-V"][..], "mke2fs"),
        ("resize2fs", &[][..], "resize2fs"),
        ("mkfs.xfs", &["-V"][..], "mkfs.xfs version"),
        ("xfs_growfs", &["-V"][..], "xfs_growfs version"),
        ("mkfs.btrfs", &["--version"][..], "btrfs-progs"),
        ("btrfs", &["--version"][..], "btrfs-progs"),
    ] {
        let (code, text) = in_rootfs(&rootfs, program, args);
        // resize2fs without a device prints its usage and exits 1.
        assert!(
            code == 0 || program == "resize2fs",
            "{program} {args:?}: {code}: {text}"
        );
        assert!(text.contains(says), "{program} {args:?}: {text}");
    }
    // What deploy/image/slim removes is gone.
    for gone in ["usr/bin/python3", "usr/share/perl", "usr/share/man/man8"] {
        assert!(
            !rootfs.join(gone).exists(),
            "{gone} is in the image (deploy/image/slim)"
        );
    }
    loud!(
        "{test}: {} ({size} bytes), {} layers, checked in {:.0} s",
        archive.display(),
        layers.len(),
        start.elapsed().as_secs_f64()
    );
}
