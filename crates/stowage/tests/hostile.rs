//! The hostile-content suite (issue 11, item 4): one driver serving a `dir` pool (the host's
//! filesystem), an `image` pool and a `btrfs` pool on a loop-mounted btrfs, attacked the way
//! a pod that owns a volume's contents, or whoever sends CSI requests, can attack it.
//!
//! Before the first case a **sentinel** is made outside the pools and the kubelet dir (its
//! own temporary directory, on the same filesystem as the `dir` pool so that hard links to
//! it are possible): a file, a subdirectory with a big file and a small one, an empty
//! directory and a FIFO. Byte content, inode numbers, modes, owners, link counts, mtimes and
//! the listing are recorded, and after **every** case they must be identical. After every
//! case also: the driver is alive and Probe answers, nothing is mounted under the kubelet
//! dir, the sentinel or the pools (but the btrfs itself), and each pool's volumes and
//! snapshots on disk are exactly those the driver lists. Every call is bounded (20 s: a
//! call that blocks, on a FIFO say, fails the suite) and every error must carry a proper
//! gRPC code — never UNKNOWN (what a panicking handler gives).
//!
//! Cases, by class (each is one function below, or a table of rows in one function):
//! - symlinks and symlink chains (absolute, `../..` relative, symlink to symlink) to the
//!   sentinel's file and directory, at every position the driver walks: DeleteVolume,
//!   NodeGetVolumeStats, CreateSnapshot then restore and clone; and given by the CO as
//!   staging path, target path and volume_path.
//! - races: a thread swapping a directory and a symlink to the sentinel directory with
//!   renameat2(RENAME_EXCHANGE) in a tight loop during DeleteVolume, CreateSnapshot (the
//!   `dir` copy) and NodeGetVolumeStats (the usage walk); on btrfs during DeleteVolume.
//! - FIFOs, sockets and device nodes (`/dev/null`'s numbers and the host root disk's) in a
//!   volume: delete, stats, snapshot and restore never open or block on them, restores
//!   recreate them, and the published mount is `nodev` (opening the device node fails).
//! - hard links to the sentinel file (`dir` pool on the same filesystem): deletion only
//!   drops the volume's name, a snapshot copies the content into a new inode; on btrfs such
//!   a link is impossible (EXDEV).
//! - a bind mount of the sentinel directory inside a volume: DeleteVolume is
//!   FAILED_PRECONDITION and removes nothing through it; CreateSnapshot skips it.
//! - traversal strings (`..`, `../../etc`, `/etc/passwd`, `stw-../../x`, `sns-../../x`,
//!   percent-encoded, the sentinel's own path), NUL-carrying and oversized strings and maps in
//!   every id, name, parameter, context and token field of every RPC served today.
//! - mount flags outside the allow-list (`exec`, `suid`, `dev`, `bind`, `remount`, strings
//!   with commas or `=`): INVALID_ARGUMENT, nothing mounted.
//!
//! Not applicable yet (the features do not exist; the suite grows with them): static
//! (pre-provisioned) volumes and their `subPath` — symlinks, races and traversal in a subPath;
//! fsGroup / VOLUME_MOUNT_GROUP — the ownership walk with symlinks, hard links to host files
//! and directory/symlink swaps; `volume_mount_group` validation.
//!
//! Needs root (mounts, mknod, loop devices); without it the suite says SKIPPED (one test, one
//! SKIPPED line, as `scripts/test` counts them). Without `mkfs.btrfs` or loop devices the
//! btrfs and image cases say "hostile case skipped (why)", are counted apart in the last
//! line, and the rest run.

#[macro_use]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::os::unix::fs::symlink;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::Code;

/// No call may take longer than this.
const CALL: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
/// Names only the sentinel has: finding one of them in a volume or a snapshot means the
/// driver reached into the sentinel.
const SECRET: &str = "host-secret";
const BIG: &str = "sentinel-big-data";
const INNER: &str = "sentinel-inner";

// ---------------------------------------------------------------------------------------
// Calls: bounded, and never UNKNOWN.

/// Awaits a call for at most [`CALL`]; an error must have a proper code and a message.
async fn call<T>(
    what: &str,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let r = tokio::time::timeout(CALL, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in {CALL:?} (the call hung)"));
    match r {
        Ok(resp) => Ok(resp.into_inner()),
        Err(s) => {
            assert_ne!(s.code(), Code::Unknown, "{what}: UNKNOWN (a panic?): {s:?}");
            assert!(
                !s.message().is_empty(),
                "{what}: an error without a message"
            );
            Err(s)
        }
    }
}

fn code_of<T>(r: &Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Asserts a call's code.
async fn expect<T>(
    what: &str,
    want: Code,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let r = call(what, f).await;
    if code_of(&r) != want {
        panic!(
            "{what}: expected {want:?}, got {:?}",
            r.as_ref().err().map(|s| (s.code(), s.message().to_owned()))
        );
    }
    r
}

// ---------------------------------------------------------------------------------------
// The sentinel.

#[derive(Debug, PartialEq)]
struct Rec {
    rel: String,
    kind: &'static str,
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
}

struct Sentinel {
    dir: tempfile::TempDir,
    recs: Vec<Rec>,
    contents: Vec<(String, Vec<u8>)>,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(131).wrapping_add(seed as u32) as u8)
        .collect()
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else {
        "other"
    }
}

/// Every entry under `root` (itself included, as ""), sorted, nothing followed.
fn walk(root: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut out = vec![(String::new(), std::fs::symlink_metadata(root).unwrap())];
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let m = std::fs::symlink_metadata(root.join(&r)).unwrap();
            if m.is_dir() {
                stack.push(r.clone());
            }
            out.push((r.display().to_string(), m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

impl Sentinel {
    fn make() -> Sentinel {
        let dir = tempfile::Builder::new()
            .prefix("stowage-hostile-sentinel-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        std::fs::write(p.join(SECRET), pattern(1, 64 << 10)).unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();
        std::fs::write(p.join("sub").join(BIG), pattern(2, 8 * MIB as usize)).unwrap();
        std::fs::write(p.join("sub").join(INNER), b"inner sentinel").unwrap();
        std::fs::create_dir(p.join("sub/empty")).unwrap();
        std::fs::set_permissions(p.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        // Times in the past, so that any touch shows.
        for (rel, _) in walk(p) {
            let _ = Command::new("touch")
                .args(["-h", "-d", "2001-02-03 04:05:06"])
                .arg(p.join(&rel))
                .status();
        }
        let mut s = Sentinel {
            dir,
            recs: Vec::new(),
            contents: Vec::new(),
        };
        (s.recs, s.contents) = s.record();
        s
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn record(&self) -> (Vec<Rec>, Vec<(String, Vec<u8>)>) {
        let mut recs = Vec::new();
        let mut contents = Vec::new();
        for (rel, m) in walk(self.path()) {
            if m.is_file() {
                contents.push((rel.clone(), std::fs::read(self.path().join(&rel)).unwrap()));
            }
            recs.push(Rec {
                rel,
                kind: kind_of(&m),
                dev: m.dev(),
                ino: m.ino(),
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                nlink: m.nlink(),
                size: if m.is_dir() { 0 } else { m.size() },
                mtime: (m.mtime(), m.mtime_nsec()),
            });
        }
        (recs, contents)
    }

    /// Byte for byte and inode for inode what it was.
    fn check(&self, case: &str) {
        assert!(
            mounts_under(self.path()).is_empty(),
            "{case}: something is mounted on the sentinel: {:?}",
            mounts_under(self.path())
        );
        let (recs, contents) = self.record();
        assert_eq!(recs, self.recs, "{case}: the sentinel's entries changed");
        for ((rel, got), (_, want)) in contents.iter().zip(&self.contents) {
            assert!(got == want, "{case}: the content of sentinel {rel} changed");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Guards: every mount and thread a case makes is undone on every path.

/// A bind mount made by the test (as a privileged pod would); lazily unmounted on drop.
struct Bind(PathBuf);

impl Bind {
    fn new(from: &Path, at: &Path) -> Bind {
        let out = Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount --bind: {out:?}");
        Bind(at.to_owned())
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------------------
// The suite.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Dir,
    Image,
    Btrfs,
}

impl Kind {
    fn pool(self) -> &'static str {
        match self {
            Kind::Dir => "default",
            Kind::Image => "img",
            Kind::Btrfs => "sub",
        }
    }
}

/// A staged and published volume.
struct Mounted {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

struct Suite {
    h: Option<Harness>,
    /// The `dir` and `image` pools and the config.
    root: tempfile::TempDir,
    btrfs: Option<BtrfsFs>,
    image: bool,
    sentinel: Sentinel,
    cases: Vec<String>,
    skipped: Vec<String>,
    seq: usize,
}

impl Drop for Suite {
    fn drop(&mut self) {
        // The driver first (the harness unmounts what is left under its directory), then
        // whatever a failed case left mounted in the pools, then the loop devices of images.
        drop(self.h.take());
        for m in mounts_under(self.root.path())
            .into_iter()
            .chain(mounts_under(self.sentinel.path()))
        {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for sub in ["images", "snapshots"] {
            let dir = self.root.path().join("img").join(sub);
            for e in std::fs::read_dir(dir).into_iter().flatten() {
                let path = e.unwrap().path();
                let out = Command::new("losetup").arg("-j").arg(&path).output();
                for line in out
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
                    .lines()
                {
                    if let Some((dev, _)) = line.split_once(':') {
                        let _ = Command::new("losetup").arg("-d").arg(dev).status();
                    }
                }
            }
        }
        if let Some(fs) = &self.btrfs {
            for m in mounts_under(&fs.mnt.join("pool")) {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

impl Suite {
    async fn start() -> Suite {
        let root = tempfile::Builder::new()
            .prefix("stowage-hostile-pools-")
            .tempdir()
            .unwrap();
        // `min_age = "0s"`: the stats cases race swaps against the walk, so every call must
        // walk rather than answer the cached figure of an earlier call.
        let mut cfg = format!(
            "[[pool]]\nname = \"default\"\nkind = \"dir\"\npath = \"{}\"\n[pool.stats]\nmin_age = \"0s\"\n",
            root.path().join("dir").display()
        );
        let image = Path::new("/dev/loop-control").exists();
        if image {
            cfg += &format!(
                "[[pool]]\nname = \"img\"\nkind = \"image\"\npath = \"{}\"\ndefault_size = \"64Mi\"\n",
                root.path().join("img").display()
            );
        } else {
            loud!("hostile cases skipped (no /dev/loop-control): those on the image pool");
        }
        let btrfs = match btrfs_fs() {
            Ok(fs) => {
                cfg += &format!(
                    "[[pool]]\nname = \"sub\"\nkind = \"btrfs\"\npath = \"{}\"\n",
                    fs.mnt.join("pool").display()
                );
                Some(fs)
            }
            Err(why) => {
                loud!("hostile cases skipped ({why}): those on the btrfs pool");
                None
            }
        };
        let config = root.path().join("stowage.toml");
        std::fs::write(&config, cfg).unwrap();
        let sentinel = Sentinel::make();
        let h = Harness::start(&[
            "--config",
            config.to_str().unwrap(),
            "--watch-interval",
            "0",
        ])
        .await;
        Suite {
            h: Some(h),
            root,
            btrfs,
            image,
            sentinel,
            cases: Vec::new(),
            skipped: Vec::new(),
            seq: 0,
        }
    }

    fn h(&self) -> &Harness {
        self.h.as_ref().unwrap()
    }

    fn has(&self, kind: Kind) -> bool {
        match kind {
            Kind::Dir => true,
            Kind::Image => self.image,
            Kind::Btrfs => self.btrfs.is_some(),
        }
    }

    /// Whether a case on `kind` can run; says it is skipped when it cannot.
    fn can(&mut self, kind: Kind, case: &str) -> bool {
        if self.has(kind) {
            true
        } else {
            loud!("hostile case skipped (no {kind:?} pool here): {case}");
            self.skipped.push(case.to_owned());
            false
        }
    }

    fn pool_path(&self, kind: Kind) -> PathBuf {
        match kind {
            Kind::Dir => self.root.path().join("dir"),
            Kind::Image => self.root.path().join("img"),
            Kind::Btrfs => self.btrfs.as_ref().unwrap().mnt.join("pool"),
        }
    }

    /// Where a `dir` or `btrfs` volume's data is seen from the host (as its pod sees it).
    fn data(&self, kind: Kind, id: &str) -> PathBuf {
        assert_ne!(kind, Kind::Image);
        self.pool_path(kind).join("volumes").join(id)
    }

    fn name(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("hostile-{what}-{}", self.seq)
    }

    async fn controller(
        &self,
    ) -> csi::controller_client::ControllerClient<tonic::transport::Channel> {
        self.h().controller().await
    }

    async fn node(&self) -> csi::node_client::NodeClient<tonic::transport::Channel> {
        self.h().node().await
    }

    async fn create(&mut self, kind: Kind, what: &str) -> String {
        self.create_from(kind, what, None).await
    }

    async fn create_from(
        &mut self,
        kind: Kind,
        what: &str,
        source: Option<csi::VolumeContentSource>,
    ) -> String {
        let name = self.name(what);
        let mut req = create_req(&name, 64 << 20);
        req.parameters.insert("pool".into(), kind.pool().into());
        req.volume_content_source = source;
        call(
            &format!("CreateVolume {name}"),
            self.controller().await.create_volume(req),
        )
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .volume
        .unwrap()
        .volume_id
    }

    async fn delete(&self, id: &str) -> Result<csi::DeleteVolumeResponse, tonic::Status> {
        call(
            &format!("DeleteVolume {id}"),
            self.controller()
                .await
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.to_owned(),
                    secrets: HashMap::new(),
                }),
        )
        .await
    }

    async fn snapshot(&mut self, id: &str) -> Result<csi::Snapshot, tonic::Status> {
        let name = self.name("snap");
        call(
            &format!("CreateSnapshot of {id}"),
            self.controller()
                .await
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: id.to_owned(),
                    name,
                    ..Default::default()
                }),
        )
        .await
        .map(|r| r.snapshot.unwrap())
    }

    async fn delete_snapshot(&self, id: &str) {
        call(
            &format!("DeleteSnapshot {id}"),
            self.controller()
                .await
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id.to_owned(),
                    secrets: HashMap::new(),
                }),
        )
        .await
        .unwrap();
    }

    async fn stage_publish(&mut self, id: &str) -> Mounted {
        let base = self.h().kubelet().join("pods").join(self.name("pod"));
        std::fs::create_dir_all(&base).unwrap();
        let m = Mounted {
            id: id.to_owned(),
            staging: base.join("staging"),
            target: base.join("target"),
        };
        let mut n = self.node().await;
        call("NodeStageVolume", n.node_stage_volume(stage_req(&m, &[])))
            .await
            .unwrap();
        call(
            "NodePublishVolume",
            n.node_publish_volume(publish_req(&m, &[])),
        )
        .await
        .unwrap();
        m
    }

    async fn unpublish_unstage(&self, m: &Mounted) {
        let mut n = self.node().await;
        call(
            "NodeUnpublishVolume",
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: m.id.clone(),
                target_path: m.target.display().to_string(),
            }),
        )
        .await
        .unwrap();
        call(
            "NodeUnstageVolume",
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: m.id.clone(),
                staging_target_path: m.staging.display().to_string(),
            }),
        )
        .await
        .unwrap();
    }

    async fn stats(
        &self,
        id: &str,
        path: &Path,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        call(
            "NodeGetVolumeStats",
            self.node()
                .await
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: id.to_owned(),
                    volume_path: path.display().to_string(),
                    staging_target_path: String::new(),
                }),
        )
        .await
    }

    /// Ids the driver lists: volumes and snapshots.
    async fn listed(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut c = self.controller().await;
        let vols = call(
            "ListVolumes",
            c.list_volumes(csi::ListVolumesRequest::default()),
        )
        .await
        .unwrap();
        assert!(vols.next_token.is_empty(), "more volumes than one page");
        let snaps = call(
            "ListSnapshots",
            c.list_snapshots(csi::ListSnapshotsRequest::default()),
        )
        .await
        .unwrap();
        assert!(snaps.next_token.is_empty(), "more snapshots than one page");
        (
            vols.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id)
                .collect(),
            snaps
                .entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id)
                .collect(),
        )
    }

    /// What the pools hold on disk: volumes and snapshots.
    fn on_disk(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let names = |dir: PathBuf| -> Vec<String> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .map(|n| n.strip_suffix(".img").map(str::to_owned).unwrap_or(n))
                .collect()
        };
        let mut vols = BTreeSet::new();
        let mut snaps = BTreeSet::new();
        for kind in [Kind::Dir, Kind::Image, Kind::Btrfs] {
            if !self.has(kind) {
                continue;
            }
            let p = self.pool_path(kind);
            let v = if kind == Kind::Image {
                "images"
            } else {
                "volumes"
            };
            vols.extend(names(p.join(v)));
            snaps.extend(names(p.join("snapshots")));
        }
        (vols, snaps)
    }

    /// The end of a case: the host untouched, the driver alive and sound.
    async fn done(&mut self, case: &str) {
        self.sentinel.check(case);
        let h = self.h.as_mut().unwrap();
        assert!(
            h.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "{case}: the driver died; log:\n{}",
            h.log_text()
        );
        let probe = call(
            "Probe",
            self.h().identity().await.probe(csi::ProbeRequest {}),
        )
        .await
        .unwrap();
        assert_eq!(probe.ready, Some(true), "{case}: Probe not ready");
        let kubelet = mounts_under(&self.h().kubelet());
        assert!(kubelet.is_empty(), "{case}: left mounted: {kubelet:?}");
        let mut pools: Vec<PathBuf> = mounts_under(self.root.path());
        if let Some(fs) = &self.btrfs {
            pools.extend(mounts_under(&fs.mnt.join("pool")));
        }
        assert!(
            pools.is_empty(),
            "{case}: mounts left in the pools: {pools:?}"
        );
        let (listed, on_disk) = (self.listed().await, self.on_disk());
        assert_eq!(on_disk.0, listed.0, "{case}: volumes on disk vs listed");
        assert_eq!(on_disk.1, listed.1, "{case}: snapshots on disk vs listed");
        self.cases.push(case.to_owned());
        loud!("hostile case {}: {case}: host untouched", self.cases.len());
    }
}

fn stage_req(m: &Mounted, flags: &[&str]) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: m.id.clone(),
        staging_target_path: m.staging.display().to_string(),
        volume_capability: Some(mount_cap_flags(Mode::SingleNodeWriter, flags)),
        ..Default::default()
    }
}

fn publish_req(m: &Mounted, flags: &[&str]) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: m.id.clone(),
        staging_target_path: m.staging.display().to_string(),
        target_path: m.target.display().to_string(),
        volume_capability: Some(mount_cap_flags(Mode::SingleNodeWriter, flags)),
        ..Default::default()
    }
}

fn bytes_used(r: &csi::NodeGetVolumeStatsResponse) -> i64 {
    r.usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .expect("bytes usage")
        .used
}

// ---------------------------------------------------------------------------------------
// What a pod plants.

/// A relative path from directory `from` to `to` through the filesystem root, with more
/// `..` than needed (a `../../..` chain).
fn climb(from: &Path, to: &Path) -> PathBuf {
    let depth = from.components().count() + 3;
    let mut p = PathBuf::new();
    for _ in 0..depth {
        p.push("..");
    }
    p.join(to.strip_prefix("/").unwrap())
}

/// Symlinks to the sentinel's file and directory: absolute, `../..` chains, symlink to
/// symlink, nested; and a real file. Returns the names of the symlinks (relative to `root`).
/// `host_root` is where `root` is seen from the host (the same unless `root` is a mount).
fn plant_links(root: &Path, sentinel: &Path) -> Vec<(PathBuf, PathBuf)> {
    let s_file = sentinel.join(SECRET);
    let s_dir = sentinel.join("sub");
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::write(root.join("a/b/c/real"), pattern(9, 4096)).unwrap();
    let links: Vec<(PathBuf, PathBuf)> = vec![
        ("abs-file".into(), s_file.clone()),
        ("abs-dir".into(), s_dir.clone()),
        ("a/rel-file".into(), climb(&root.join("a"), &s_file)),
        ("a/b/rel-dir".into(), climb(&root.join("a/b"), &s_dir)),
        ("a/b/c/up".into(), "../../../../../../../../../..".into()),
        // symlink → symlink → symlink → the sentinel directory
        ("chain1".into(), "chain2".into()),
        ("chain2".into(), "a/chain3".into()),
        ("a/chain3".into(), "../abs-dir".into()),
        // a symlink named like what the driver itself makes
        ("a/b/c/volumes".into(), s_dir.clone()),
        ("a/b/snapshots".into(), sentinel.to_owned()),
    ];
    for (at, to) in &links {
        symlink(to, root.join(at)).unwrap();
    }
    links
}

/// The planted symlinks are symlinks under `root`, with the same target text.
fn check_links(root: &Path, links: &[(PathBuf, PathBuf)], what: &str) {
    for (at, to) in links {
        let p = root.join(at);
        let m = std::fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("{what}: {} missing: {e}", p.display()));
        assert!(
            m.file_type().is_symlink(),
            "{what}: {} is no symlink",
            p.display()
        );
        assert_eq!(
            &std::fs::read_link(&p).unwrap(),
            to,
            "{what}: {}",
            p.display()
        );
    }
    assert_eq!(
        std::fs::read(root.join("a/b/c/real")).unwrap(),
        pattern(9, 4096),
        "{what}: the real file"
    );
}

/// The major:minor of the block device the host's root filesystem is on.
fn host_root_disk() -> u64 {
    std::fs::metadata("/").unwrap().dev()
}

/// FIFO, socket, `/dev/null`'s char device, the host root disk's block device.
fn plant_specials(root: &Path) -> Vec<(&'static str, &'static str, u64)> {
    use rustix::fs::FileType as T;
    let items = vec![
        ("fifo", "fifo", 0),
        ("sock", "socket", 0),
        ("null", "char", rustix::fs::makedev(1, 3)),
        ("disk", "block", host_root_disk()),
    ];
    std::fs::create_dir_all(root.join("dev")).unwrap();
    for (name, kind, rdev) in &items {
        let t = match *kind {
            "fifo" => T::Fifo,
            "socket" => T::Socket,
            "char" => T::CharacterDevice,
            _ => T::BlockDevice,
        };
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("dev").join(name),
            t,
            rustix::fs::Mode::from_raw_mode(0o666),
            *rdev,
        )
        .unwrap();
    }
    items
}

fn check_specials(root: &Path, items: &[(&'static str, &'static str, u64)], what: &str) {
    for (name, kind, rdev) in items {
        let p = root.join("dev").join(name);
        let m = std::fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("{what}: {} missing: {e}", p.display()));
        assert_eq!(kind_of(&m), *kind, "{what}: {}", p.display());
        if *rdev != 0 {
            assert_eq!(m.rdev(), *rdev, "{what}: {} device numbers", p.display());
        }
    }
}

/// Entries anywhere under `root` named like the sentinel's own files, nothing followed.
fn sentinel_names_under(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|(rel, _)| [SECRET, BIG, INNER].iter().any(|n| rel.ends_with(n)))
        .filter(|(_, m)| !m.file_type().is_symlink())
        .map(|(rel, _)| rel)
        .collect()
}

/// A wide tree, so that walks take a while (races get their chance).
fn plant_tree(dir: &Path, n: usize) {
    for i in 0..n {
        let d = dir.join(format!("d{i}"));
        std::fs::create_dir_all(&d).unwrap();
        for j in 0..8 {
            std::fs::write(d.join(format!("f{j}")), b"pod data").unwrap();
        }
    }
}

fn from_snapshot(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: id.to_owned(),
            },
        )),
    })
}

fn from_volume(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.to_owned(),
            },
        )),
    })
}

// ---------------------------------------------------------------------------------------
// Strings.

/// Well-formed strings (at most 128 bytes, no NUL) that look like paths: never ours.
fn traversal(s: &Suite) -> Vec<String> {
    let mut v: Vec<String> = [
        "..",
        ".",
        "../../etc",
        "/etc/passwd",
        "stw-../../x",
        "sns-../../x",
        "stw-00000000000000000000000000000000/../../x",
        "sns-00000000000000000000000000000000/..",
        "%2e%2e%2f%2e%2e%2fetc",
        "stw-%2e%2e%2f%2e%2e",
        "..%00/etc",
        "a/../../../../b",
        "volumes/../../../etc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = s.sentinel.path().display().to_string();
    if p.len() <= 128 {
        v.push(p);
    }
    v
}

/// Strings no field may carry: NUL, over 128 bytes.
fn malformed() -> Vec<String> {
    vec![
        "a\0b".into(),
        "stw-\0../../x".into(),
        "\0".into(),
        "x".repeat(129),
        "../".repeat(50),
        format!("stw-{}", "0".repeat(4096)),
    ]
}

fn big_map() -> HashMap<String, String> {
    (0..64)
        .map(|i| (format!("k{i:03}"), "v".repeat(100)))
        .collect()
}

fn show(s: &str) -> String {
    let mut t: String = s.chars().take(40).collect();
    if s.len() > 40 {
        t.push('…');
    }
    format!("{t:?}")
}

// ---------------------------------------------------------------------------------------
// Cases: symlinks.

async fn delete_through_symlink_chains(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: DeleteVolume of a volume full of symlinks to the host");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "del-links").await;
    let root = s.data(kind, &id);
    plant_links(&root, s.sentinel.path());
    plant_links(&root.join("a/b/c"), s.sentinel.path());
    s.delete(&id).await.unwrap();
    assert!(!root.exists(), "{case}: the volume is still there");
    s.done(&case).await;
}

async fn stats_through_symlink_chains(s: &mut Suite) {
    let case = "dir: NodeGetVolumeStats walks a volume full of symlinks to the host";
    let id = s.create(Kind::Dir, "stats-links").await;
    plant_links(&s.data(Kind::Dir, &id), s.sentinel.path());
    let m = s.stage_publish(&id).await;
    for path in [&m.target, &m.staging] {
        let st = s.stats(&id, path).await.unwrap();
        let used = bytes_used(&st);
        assert!(
            (4096..(MIB as i64)).contains(&used),
            "{case}: used {used}: symlinked sentinel files counted (or the real file not)"
        );
    }
    s.unpublish_unstage(&m).await;
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

async fn snapshot_restore_clone_keep_symlinks(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: CreateSnapshot, restore and clone of symlinks to the host");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "snap-links").await;
    // The pod's view: for an image volume, through its mount.
    let m = if kind == Kind::Image {
        Some(s.stage_publish(&id).await)
    } else {
        None
    };
    let root = m
        .as_ref()
        .map_or_else(|| s.data(kind, &id), |m| m.target.clone());
    let links = plant_links(&root, s.sentinel.path());
    if let Some(m) = &m {
        rustix::fs::syncfs(std::fs::File::open(&m.target).unwrap()).unwrap();
    }
    let snap = s.snapshot(&id).await.unwrap();
    if kind == Kind::Dir {
        let copy = s.pool_path(kind).join("snapshots").join(&snap.snapshot_id);
        assert!(
            copy.is_dir(),
            "{case}: where the dir snapshot is: {}",
            copy.display()
        );
        let found = sentinel_names_under(&copy);
        assert!(
            found.is_empty(),
            "{case}: the snapshot holds sentinel files: {found:?}"
        );
    }
    let restored = s
        .create_from(kind, "restored", from_snapshot(&snap.snapshot_id))
        .await;
    let clone = s.create_from(kind, "clone", from_volume(&id)).await;
    if let Some(m) = &m {
        s.unpublish_unstage(m).await;
    }
    for (v, what) in [(&restored, "restore"), (&clone, "clone")] {
        // Reading through the published copy: the links are links; resolving them is the
        // reader's business (in a pod, inside the pod's root), never the driver's.
        let pm = s.stage_publish(v).await;
        check_links(&pm.target, &links, &format!("{case}: {what}"));
        let found = sentinel_names_under(&pm.target);
        assert!(
            found.is_empty(),
            "{case}: {what} holds sentinel files: {found:?}"
        );
        s.unpublish_unstage(&pm).await;
        s.delete(v).await.unwrap();
    }
    s.delete_snapshot(&snap.snapshot_id).await;
    s.delete(&id).await.unwrap();
    s.done(&case).await;
}

async fn co_paths_that_are_symlinks_to_the_sentinel(s: &mut Suite) {
    let case = "dir: staging, target and volume_path that are symlinks to the sentinel";
    let id = s.create(Kind::Dir, "co-links").await;
    let base = s.h().kubelet().join("pods/co-links");
    std::fs::create_dir_all(&base).unwrap();
    let sent = s.sentinel.path().to_owned();
    let mut n = s.node().await;
    // A staging path that is a symlink to the sentinel directory, and one whose parent is.
    symlink(&sent, base.join("staging-link")).unwrap();
    symlink(&sent, base.join("parent-link")).unwrap();
    for staging in [base.join("staging-link"), base.join("parent-link/sub")] {
        let m = Mounted {
            id: id.clone(),
            staging: staging.clone(),
            target: base.join("unused"),
        };
        expect(
            &format!("stage at {}", staging.display()),
            Code::InvalidArgument,
            n.node_stage_volume(stage_req(&m, &[])),
        )
        .await
        .ok();
    }
    // Publish at a symlinked target (and under a symlinked parent) of a staged volume.
    let mut m = Mounted {
        id: id.clone(),
        staging: base.join("staging"),
        target: base.join("staging-link"),
    };
    call("stage", n.node_stage_volume(stage_req(&m, &[])))
        .await
        .unwrap();
    for target in [base.join("staging-link"), base.join("parent-link/sub")] {
        m.target = target.clone();
        expect(
            &format!("publish at {}", target.display()),
            Code::InvalidArgument,
            n.node_publish_volume(publish_req(&m, &[])),
        )
        .await
        .ok();
        // Stats and expansion at a symlinked volume_path.
        let r = s.stats(&id, &target).await;
        assert!(
            matches!(code_of(&r), Code::InvalidArgument | Code::NotFound),
            "{case}: stats at {}: {:?}",
            target.display(),
            r.err()
        );
        let r = call(
            "NodeExpandVolume",
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 128 << 20,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
        .await;
        assert!(
            matches!(code_of(&r), Code::InvalidArgument | Code::NotFound),
            "{case}: expand at {}: {:?}",
            target.display(),
            r.err()
        );
    }
    // Unpublish and unstage through a symlink to the real mounts never unmount them.
    m.target = base.join("target");
    call("publish", n.node_publish_volume(publish_req(&m, &[])))
        .await
        .unwrap();
    symlink(&m.target, base.join("target-link")).unwrap();
    symlink(&m.staging, base.join("staging-link2")).unwrap();
    let r = call(
        "unpublish via a symlink",
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: base.join("target-link").display().to_string(),
        }),
    )
    .await;
    assert!(
        matches!(code_of(&r), Code::Ok | Code::InvalidArgument),
        "{case}: {r:?}"
    );
    assert_eq!(
        mount_count(&m.target),
        1,
        "{case}: unmounted through a symlink"
    );
    let r = call(
        "unstage via a symlink",
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: base.join("staging-link2").display().to_string(),
        }),
    )
    .await;
    assert!(
        matches!(code_of(&r), Code::Ok | Code::InvalidArgument),
        "{case}: {r:?}"
    );
    assert_eq!(
        mount_count(&m.staging),
        1,
        "{case}: unstaged through a symlink"
    );
    s.unpublish_unstage(&m).await;
    s.delete(&id).await.unwrap();
    std::fs::remove_dir_all(&base).unwrap();
    s.done(case).await;
}

// ---------------------------------------------------------------------------------------
// Cases: races.

/// A volume with `race/d` (a tree) and `race/s` (a symlink to the sentinel's directory), and
/// a thread exchanging them.
fn racing(root: &Path, sentinel: &Path, width: usize) -> Swapper {
    Swapper::start(plant_race(root, sentinel, width))
}

/// What [`racing`] swaps: `race/d` and `race/s`, and 16 more pairs.
fn plant_race(root: &Path, sentinel: &Path, width: usize) -> Vec<(PathBuf, PathBuf)> {
    let d = root.join("race/d");
    plant_tree(&d, width);
    symlink(sentinel.join("sub"), root.join("race/s")).unwrap();
    // More pairs beside it, so that a walk meets a swapping entry many times.
    let mut pairs = vec![(d, root.join("race/s"))];
    for i in 0..16 {
        let (d, l) = (
            root.join(format!("race/d{i}")),
            root.join(format!("race/s{i}")),
        );
        plant_tree(&d, 1);
        symlink(sentinel.join("sub"), &l).unwrap();
        pairs.push((d, l));
    }
    pairs
}

async fn race_delete(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: DeleteVolume while a directory and a symlink to the host swap");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "race-del").await;
    let root = s.data(kind, &id);
    let swapper = racing(&root, s.sentinel.path(), 200);
    let mut failed = Vec::new();
    let mut ok = false;
    for _ in 0..3 {
        match s.delete(&id).await {
            Ok(_) => {
                ok = true;
                break;
            }
            Err(e) => failed.push(e.code()),
        }
    }
    let swaps = swapper.stop();
    if !ok {
        s.delete(&id).await.unwrap();
    }
    assert!(!root.exists(), "{case}: the volume survived");
    loud!("  {case}: {swaps} exchanges; refused meanwhile: {failed:?}");
    s.done(&case).await;
}

async fn race_snapshot(s: &mut Suite) {
    let case = "dir: CreateSnapshot copies while a directory and a symlink to the host swap";
    let id = s.create(Kind::Dir, "race-snap").await;
    let root = s.data(Kind::Dir, &id);
    let swapper = racing(&root, s.sentinel.path(), 40);
    let mut made = Vec::new();
    let mut failed = Vec::new();
    // Until the race has made a copy fail once (or 8 attempts): a failed copy leaves nothing
    // in the snapshot area (it used to stay there, unlisted, until a retry or a restart).
    for _ in 0..8 {
        match s.snapshot(&id).await {
            Ok(snap) => made.push(snap.snapshot_id),
            Err(e) => {
                failed.push(e.code());
                let mut left: Vec<String> =
                    std::fs::read_dir(s.pool_path(Kind::Dir).join("snapshots"))
                        .unwrap()
                        .map(|e| e.unwrap().file_name().into_string().unwrap())
                        .collect();
                left.sort();
                let mut want = made.clone();
                want.sort();
                assert_eq!(left, want, "{case}: a failed copy was left behind ({e:?})");
                break;
            }
        }
    }
    let swaps = swapper.stop();
    for snap in &made {
        let copy = s.pool_path(Kind::Dir).join("snapshots").join(snap);
        let found = sentinel_names_under(&copy);
        assert!(
            found.is_empty(),
            "{case}: {snap} holds sentinel files: {found:?}"
        );
    }
    loud!(
        "  {case}: {swaps} exchanges; {} snapshots made, refused: {failed:?}",
        made.len()
    );
    for snap in &made {
        s.delete_snapshot(snap).await;
    }
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

async fn race_stats(s: &mut Suite) {
    let case = "dir: NodeGetVolumeStats walks while a directory and a symlink to the host swap";
    let id = s.create(Kind::Dir, "race-stats").await;
    let root = s.data(Kind::Dir, &id);
    let m = s.stage_publish(&id).await;
    let pairs = plant_race(&root, s.sentinel.path(), 20);
    let alone = bytes_used(&s.stats(&id, &m.target).await.unwrap());
    let swapper = Swapper::start(pairs);
    let mut failed = Vec::new();
    for _ in 0..10 {
        match s.stats(&id, &m.target).await {
            Ok(st) => {
                // The swapped directory may be met twice (under both names) or not at all;
                // the sentinel's 8 MiB file never.
                let used = bytes_used(&st);
                assert!(
                    used <= 2 * alone + 64 * 1024 && used < 8 * MIB as i64,
                    "{case}: used {used} (the volume alone {alone}): the sentinel's big file was counted"
                );
            }
            Err(e) => failed.push(e.code()),
        }
    }
    let swaps = swapper.stop();
    loud!("  {case}: {swaps} exchanges; refused: {failed:?}");
    s.unpublish_unstage(&m).await;
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

// ---------------------------------------------------------------------------------------
// Cases: FIFOs, sockets, device nodes.

async fn specials_delete(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: DeleteVolume of FIFOs, sockets and device nodes");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "special-del").await;
    let root = s.data(kind, &id);
    plant_specials(&root);
    plant_specials(&root.join("dev"));
    s.delete(&id).await.unwrap();
    assert!(!root.exists());
    s.done(&case).await;
}

async fn specials_stats_and_nodev(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: stats of FIFOs and devices; the published mount is nodev");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "special-stats").await;
    let m = s.stage_publish(&id).await;
    let items = plant_specials(&m.target);
    s.stats(&id, &m.target).await.unwrap();
    s.stats(&id, &m.staging).await.unwrap();
    for at in [&m.target, &m.staging] {
        let opts = mount_options(at).unwrap();
        assert!(opts.split(',').any(|o| o == "nodev"), "{case}: {opts}");
        assert!(opts.split(',').any(|o| o == "nosuid"), "{case}: {opts}");
    }
    // The device nodes give the pod nothing: nodev refuses to open them.
    for dev in ["null", "disk"] {
        let e = std::fs::OpenOptions::new()
            .read(true)
            .open(m.target.join("dev").join(dev))
            .expect_err("a device node opened through a nodev mount");
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::ACCESS.raw_os_error()),
            "{case}: {dev}: {e}"
        );
    }
    check_specials(&m.target, &items, &case);
    s.unpublish_unstage(&m).await;
    s.delete(&id).await.unwrap();
    s.done(&case).await;
}

async fn specials_snapshot_restore(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: snapshot and restore of FIFOs, sockets and device nodes");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "special-snap").await;
    let m = s.stage_publish(&id).await;
    let items = plant_specials(&m.target);
    rustix::fs::syncfs(std::fs::File::open(&m.target).unwrap()).unwrap();
    let snap = s.snapshot(&id).await.unwrap();
    let restored = s
        .create_from(kind, "special-restored", from_snapshot(&snap.snapshot_id))
        .await;
    s.unpublish_unstage(&m).await;
    let rm = s.stage_publish(&restored).await;
    check_specials(&rm.target, &items, &format!("{case}: restored"));
    s.unpublish_unstage(&rm).await;
    s.delete(&restored).await.unwrap();
    s.delete_snapshot(&snap.snapshot_id).await;
    s.delete(&id).await.unwrap();
    s.done(&case).await;
}

// ---------------------------------------------------------------------------------------
// Cases: hard links.

async fn hard_link_to_the_sentinel(s: &mut Suite) {
    let case = "dir: a hard link to a host file: snapshot copies it, deletion drops only the name";
    let id = s.create(Kind::Dir, "hardlink").await;
    let root = s.data(Kind::Dir, &id);
    let secret = s.sentinel.path().join(SECRET);
    let host = std::fs::metadata(&secret).unwrap();
    if std::fs::metadata(&root).unwrap().dev() != host.dev() {
        loud!("hostile case skipped (the dir pool is not on the sentinel's filesystem): {case}");
        s.skipped.push(case.to_owned());
        s.delete(&id).await.unwrap();
        return;
    }
    std::fs::hard_link(&secret, root.join("linked")).unwrap();
    std::fs::create_dir(root.join("x")).unwrap();
    std::fs::hard_link(&secret, root.join("x/again")).unwrap();
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 3);
    let snap = s.snapshot(&id).await.unwrap();
    let copy = s
        .pool_path(Kind::Dir)
        .join("snapshots")
        .join(&snap.snapshot_id);
    let restored = s
        .create_from(Kind::Dir, "hl-restored", from_snapshot(&snap.snapshot_id))
        .await;
    for (at, what) in [
        (copy, "snapshot"),
        (s.data(Kind::Dir, &restored), "restore"),
    ] {
        let mut found = 0;
        for (rel, m) in walk(&at) {
            if m.is_file() {
                found += 1;
                assert_ne!(
                    m.ino(),
                    host.ino(),
                    "{case}: {what} {rel} is the host's inode"
                );
                assert_eq!(
                    std::fs::read(at.join(&rel)).unwrap(),
                    std::fs::read(&secret).unwrap(),
                    "{case}: {what} {rel}"
                );
            }
        }
        assert_eq!(found, 2, "{case}: {what} files");
    }
    // Writing into the restored copy never reaches the host file (checked by done()).
    std::fs::write(s.data(Kind::Dir, &restored).join("linked"), b"pod writes").unwrap();
    s.delete(&restored).await.unwrap();
    s.delete_snapshot(&snap.snapshot_id).await;
    s.delete(&id).await.unwrap();
    // done() checks the link count is back to 1 and the content intact.
    s.done(case).await;
}

async fn hard_link_across_filesystems(s: &mut Suite) {
    let case = "btrfs: a hard link to a host file cannot be made (EXDEV)";
    if !s.can(Kind::Btrfs, case) {
        return;
    }
    let id = s.create(Kind::Btrfs, "hardlink-xdev").await;
    let e = std::fs::hard_link(
        s.sentinel.path().join(SECRET),
        s.data(Kind::Btrfs, &id).join("l"),
    )
    .expect_err("a hard link across filesystems");
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::XDEV.raw_os_error())
    );
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

// ---------------------------------------------------------------------------------------
// Cases: bind mounts inside a volume.

async fn bind_mount_before_delete(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: DeleteVolume with the host directory bind-mounted inside");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "bind-del").await;
    let root = s.data(kind, &id);
    std::fs::create_dir_all(root.join("a/door")).unwrap();
    std::fs::write(root.join("a/pod-file"), b"x").unwrap();
    std::fs::write(root.join("file-door"), b"").unwrap();
    let binds = [
        Bind::new(s.sentinel.path(), &root.join("a/door")),
        Bind::new(&s.sentinel.path().join(SECRET), &root.join("file-door")),
    ];
    for _ in 0..2 {
        let r = s.delete(&id).await;
        assert_eq!(code_of(&r), Code::FailedPrecondition, "{case}: {r:?}");
    }
    assert!(root.join("a/door").join(SECRET).exists());
    drop(binds);
    s.sentinel.check(&case);
    s.delete(&id).await.unwrap();
    assert!(!root.exists());
    s.done(&case).await;
}

async fn bind_mount_before_snapshot(s: &mut Suite, kind: Kind) {
    let case = format!("{kind:?}: CreateSnapshot with the host directory bind-mounted inside");
    if !s.can(kind, &case) {
        return;
    }
    let id = s.create(kind, "bind-snap").await;
    let root = s.data(kind, &id);
    std::fs::create_dir_all(root.join("a/door")).unwrap();
    std::fs::write(root.join("a/pod-file"), b"pod").unwrap();
    let bind = Bind::new(s.sentinel.path(), &root.join("a/door"));
    let snap = s.snapshot(&id).await;
    drop(bind);
    let snap = snap.unwrap_or_else(|e| panic!("{case}: {e:?}"));
    if kind == Kind::Dir {
        let copy = s.pool_path(kind).join("snapshots").join(&snap.snapshot_id);
        let found = sentinel_names_under(&copy);
        assert!(
            found.is_empty(),
            "{case}: the snapshot holds sentinel files: {found:?}"
        );
        assert_eq!(std::fs::read(copy.join("a/pod-file")).unwrap(), b"pod");
    }
    let restored = s
        .create_from(kind, "bind-restored", from_snapshot(&snap.snapshot_id))
        .await;
    let rroot = s.data(kind, &restored);
    let found = sentinel_names_under(&rroot);
    assert!(
        found.is_empty(),
        "{case}: the restore holds sentinel files: {found:?}"
    );
    assert_eq!(std::fs::read(rroot.join("a/pod-file")).unwrap(), b"pod");
    s.delete(&restored).await.unwrap();
    s.delete_snapshot(&snap.snapshot_id).await;
    s.delete(&id).await.unwrap();
    s.done(&case).await;
}

// ---------------------------------------------------------------------------------------
// Cases: strings in every field.

async fn strings_create_volume(s: &mut Suite) {
    let case = "CreateVolume: traversal, NUL and oversized names, parameters and sources";
    let mut c = s.controller().await;
    let base = || create_req("hostile-strings", 1 << 20);
    // Names are keys, never paths: a traversal name makes a normal volume.
    for name in traversal(s) {
        let mut req = base();
        req.name = name.clone();
        let v = expect(
            &format!("name {}", show(&name)),
            Code::Ok,
            c.create_volume(req),
        )
        .await
        .unwrap()
        .volume
        .unwrap();
        assert!(
            v.volume_id.starts_with("stw-") && v.volume_id.len() == 36,
            "{v:?}"
        );
        assert!(s.data(Kind::Dir, &v.volume_id).is_dir());
        s.delete(&v.volume_id).await.unwrap();
    }
    for name in malformed()
        .into_iter()
        .chain(["\n".into(), "a\u{7f}b".into()])
    {
        let mut req = base();
        req.name = name.clone();
        expect(
            &format!("name {}", show(&name)),
            Code::InvalidArgument,
            c.create_volume(req),
        )
        .await
        .ok();
    }
    // Parameters: known keys only, pool names checked, values bounded.
    let mut bad_params: Vec<HashMap<String, String>> = Vec::new();
    for v in traversal(s).into_iter().chain(malformed()) {
        bad_params.push([("pool".to_string(), v.clone())].into());
        bad_params.push([("allocation".to_string(), v.clone())].into());
        bad_params.push([(v.clone(), "default".to_string())].into());
    }
    bad_params.push(big_map());
    bad_params.push([("csi.storage.k8s.io/pvc/name".to_string(), "x".repeat(4000))].into());
    for p in bad_params {
        let mut req = base();
        let what = format!(
            "parameters {:?}",
            p.iter().next().map(|(k, v)| (show(k), show(v)))
        );
        req.parameters = p;
        expect(&what, Code::InvalidArgument, c.create_volume(req))
            .await
            .ok();
    }
    // Metadata parameters are only metadata.
    let mut req = base();
    req.name = "hostile-meta".into();
    for k in [
        "csi.storage.k8s.io/pvc/name",
        "csi.storage.k8s.io/pvc/namespace",
        "csi.storage.k8s.io/pv/name",
    ] {
        req.parameters.insert(k.into(), "../../../etc".into());
    }
    let v = expect("metadata parameters", Code::Ok, c.create_volume(req))
        .await
        .unwrap()
        .volume
        .unwrap();
    s.delete(&v.volume_id).await.unwrap();
    // Content sources: foreign ids are NOT_FOUND, malformed ones INVALID_ARGUMENT.
    for (ids, want) in [
        (traversal(s), Code::NotFound),
        (malformed(), Code::InvalidArgument),
    ] {
        for id in ids {
            for src in [from_snapshot(&id), from_volume(&id)] {
                let mut req = base();
                req.volume_content_source = src;
                expect(&format!("source {}", show(&id)), want, c.create_volume(req))
                    .await
                    .ok();
            }
        }
    }
    s.done(case).await;
}

async fn strings_volume_ids(s: &mut Suite) {
    let case = "DeleteVolume, ControllerExpand, Validate, GetVolume: traversal and malformed ids";
    let mut c = s.controller().await;
    let cap = mount_cap(Mode::SingleNodeWriter);
    for (ids, bad) in [(traversal(s), false), (malformed(), true)] {
        for id in ids.into_iter().chain(bad.then(String::new)) {
            let w = show(&id);
            let code = |ok: Code| if bad { Code::InvalidArgument } else { ok };
            expect(
                &format!("DeleteVolume {w}"),
                code(Code::Ok),
                c.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: HashMap::new(),
                }),
            )
            .await
            .ok();
            expect(
                &format!("ControllerExpandVolume {w}"),
                code(Code::NotFound),
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 2 << 20,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                }),
            )
            .await
            .ok();
            expect(
                &format!("ValidateVolumeCapabilities {w}"),
                code(Code::NotFound),
                c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: id.clone(),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                }),
            )
            .await
            .ok();
            expect(
                &format!("ControllerGetVolume {w}"),
                code(Code::NotFound),
                c.controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: id.clone(),
                }),
            )
            .await
            .ok();
        }
    }
    s.done(case).await;
}

async fn strings_validate_contexts(s: &mut Suite) {
    let case = "ValidateVolumeCapabilities: hostile volume_context and parameters of a real volume";
    let id = s.create(Kind::Dir, "validate").await;
    let mut c = s.controller().await;
    let req = |ctx: HashMap<String, String>, params: HashMap<String, String>| {
        csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            volume_context: ctx,
            parameters: params,
            ..Default::default()
        }
    };
    // Well-formed but wrong: not confirmed.
    for v in traversal(s) {
        for (ctx, params) in [
            ([("subPath".to_string(), v.clone())].into(), HashMap::new()),
            (HashMap::new(), [("pool".to_string(), v.clone())].into()),
        ] {
            let r = expect(
                &format!("validate {}", show(&v)),
                Code::Ok,
                c.validate_volume_capabilities(req(ctx, params)),
            )
            .await
            .unwrap();
            assert!(r.confirmed.is_none(), "{case}: {} confirmed", show(&v));
        }
    }
    // Malformed maps: INVALID_ARGUMENT (or not confirmed; never an error of another kind).
    for bad in malformed() {
        for (ctx, params) in [
            ([(bad.clone(), "v".to_string())].into(), HashMap::new()),
            (HashMap::new(), [("pool".to_string(), bad.clone())].into()),
        ] {
            let r = call(
                &format!("validate {}", show(&bad)),
                c.validate_volume_capabilities(req(ctx, params)),
            )
            .await;
            match r {
                Ok(r) => assert!(r.confirmed.is_none(), "{case}: {} confirmed", show(&bad)),
                Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{case}: {e:?}"),
            }
        }
    }
    let r = call(
        "validate big map",
        c.validate_volume_capabilities(req(big_map(), HashMap::new())),
    )
    .await;
    match r {
        Ok(r) => assert!(r.confirmed.is_none(), "{case}: a 6 KiB context confirmed"),
        Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{case}: {e:?}"),
    }
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

async fn strings_snapshots(s: &mut Suite) {
    let case = "CreateSnapshot, DeleteSnapshot, GetSnapshot: traversal and malformed ids, names, parameters";
    let id = s.create(Kind::Dir, "snap-strings").await;
    let mut c = s.controller().await;
    let snap_req =
        |name: &str, source: &str, params: HashMap<String, String>| csi::CreateSnapshotRequest {
            source_volume_id: source.to_owned(),
            name: name.to_owned(),
            parameters: params,
            ..Default::default()
        };
    // A traversal name is a key: a normal snapshot.
    for name in ["../../x", "/etc/passwd", "sns-../../x"] {
        let snap = expect(
            &format!("CreateSnapshot name {name}"),
            Code::Ok,
            c.create_snapshot(snap_req(name, &id, HashMap::new())),
        )
        .await
        .unwrap()
        .snapshot
        .unwrap();
        assert!(snap.snapshot_id.starts_with("sns-") && snap.snapshot_id.len() == 36);
        s.delete_snapshot(&snap.snapshot_id).await;
    }
    for bad in malformed().into_iter().chain([String::new()]) {
        expect(
            &format!("CreateSnapshot name {}", show(&bad)),
            Code::InvalidArgument,
            c.create_snapshot(snap_req(&bad, &id, HashMap::new())),
        )
        .await
        .ok();
    }
    for (ids, bad) in [(traversal(s), false), (malformed(), true)] {
        for sid in ids {
            let w = show(&sid);
            let code = |ok: Code| if bad { Code::InvalidArgument } else { ok };
            expect(
                &format!("CreateSnapshot source {w}"),
                code(Code::NotFound),
                c.create_snapshot(snap_req("hostile-src", &sid, HashMap::new())),
            )
            .await
            .ok();
            expect(
                &format!("CreateSnapshot parameter {w}"),
                Code::InvalidArgument,
                c.create_snapshot(snap_req(
                    "hostile-param",
                    &id,
                    [(sid.clone(), "v".to_string())].into(),
                )),
            )
            .await
            .ok();
            expect(
                &format!("DeleteSnapshot {w}"),
                code(Code::Ok),
                c.delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: sid.clone(),
                    secrets: HashMap::new(),
                }),
            )
            .await
            .ok();
            expect(
                &format!("GetSnapshot {w}"),
                code(Code::NotFound),
                c.get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: sid.clone(),
                    secrets: HashMap::new(),
                }),
            )
            .await
            .ok();
        }
    }
    expect(
        "CreateSnapshot big parameters",
        Code::InvalidArgument,
        c.create_snapshot(snap_req("hostile-big", &id, big_map())),
    )
    .await
    .ok();
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

async fn strings_listings(s: &mut Suite) {
    let case = "ListVolumes and ListSnapshots: hostile filters and tokens";
    let mut c = s.controller().await;
    for (ids, bad) in [(traversal(s), false), (malformed(), true)] {
        for v in ids {
            let w = show(&v);
            let r = expect(
                &format!("ListSnapshots snapshot_id {w}"),
                if bad { Code::InvalidArgument } else { Code::Ok },
                c.list_snapshots(csi::ListSnapshotsRequest {
                    snapshot_id: v.clone(),
                    ..Default::default()
                }),
            )
            .await;
            if let Ok(r) = r {
                assert!(r.entries.is_empty(), "{case}: {w} matched");
            }
            let r = expect(
                &format!("ListSnapshots source_volume_id {w}"),
                if bad { Code::InvalidArgument } else { Code::Ok },
                c.list_snapshots(csi::ListSnapshotsRequest {
                    source_volume_id: v.clone(),
                    ..Default::default()
                }),
            )
            .await;
            if let Ok(r) = r {
                assert!(r.entries.is_empty(), "{case}: {w} matched");
            }
            let token_code = if bad {
                Code::InvalidArgument
            } else {
                Code::Aborted
            };
            expect(
                &format!("ListSnapshots token {w}"),
                token_code,
                c.list_snapshots(csi::ListSnapshotsRequest {
                    starting_token: v.clone(),
                    ..Default::default()
                }),
            )
            .await
            .ok();
            expect(
                &format!("ListVolumes token {w}"),
                token_code,
                c.list_volumes(csi::ListVolumesRequest {
                    starting_token: v.clone(),
                    ..Default::default()
                }),
            )
            .await
            .ok();
        }
    }
    for max in [-1, i32::MIN] {
        expect(
            "ListVolumes max_entries",
            Code::InvalidArgument,
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: max,
                ..Default::default()
            }),
        )
        .await
        .ok();
    }
    s.done(case).await;
}

async fn strings_node_ids(s: &mut Suite) {
    let case = "Node calls: traversal and malformed volume ids";
    let base = s.h().kubelet().join("pods/ids");
    std::fs::create_dir_all(&base).unwrap();
    let mut n = s.node().await;
    for (ids, bad) in [(traversal(s), false), (malformed(), true)] {
        for id in ids.into_iter().chain(bad.then(String::new)) {
            let w = show(&id);
            let m = Mounted {
                id: id.clone(),
                staging: base.join("staging"),
                target: base.join("target"),
            };
            let code = |ok: Code| if bad { Code::InvalidArgument } else { ok };
            expect(
                &format!("stage {w}"),
                code(Code::NotFound),
                n.node_stage_volume(stage_req(&m, &[])),
            )
            .await
            .ok();
            expect(
                &format!("publish {w}"),
                code(Code::NotFound),
                n.node_publish_volume(publish_req(&m, &[])),
            )
            .await
            .ok();
            // Nothing was ever published or staged there: OK or NOT_FOUND, nothing done.
            for r in [
                call(
                    "unpublish",
                    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: m.target.display().to_string(),
                    }),
                )
                .await
                .map(|_| ()),
                call(
                    "unstage",
                    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: m.staging.display().to_string(),
                    }),
                )
                .await
                .map(|_| ()),
            ] {
                let got = code_of(&r);
                if bad {
                    assert_eq!(got, Code::InvalidArgument, "{case}: {w}: {r:?}");
                } else {
                    assert!(
                        matches!(got, Code::Ok | Code::NotFound),
                        "{case}: {w}: {r:?}"
                    );
                }
            }
            expect(
                &format!("stats {w}"),
                code(Code::NotFound),
                n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: m.target.display().to_string(),
                    staging_target_path: String::new(),
                }),
            )
            .await
            .ok();
            expect(
                &format!("expand {w}"),
                code(Code::NotFound),
                n.node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: m.target.display().to_string(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 2 << 20,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }),
            )
            .await
            .ok();
        }
    }
    assert!(
        walk(&base).len() == 1,
        "{case}: something was made in the pod directory: {:?}",
        walk(&base).into_iter().map(|e| e.0).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&base).unwrap();
    s.done(case).await;
}

/// Paths the CO must never get a mount at: outside the kubelet dir (the sentinel itself),
/// dotted, relative, NUL-carrying, oversized.
fn hostile_paths(s: &Suite) -> Vec<String> {
    let k = s.h().kubelet();
    let kd = k.display().to_string();
    let sent = s.sentinel.path().display().to_string();
    vec![
        sent.clone(),
        format!("{sent}/sub"),
        format!("{kd}/../../{}", sent.trim_start_matches('/')),
        format!("{kd}/pods/../../x"),
        format!("{kd}/pods/./x"),
        format!("{kd}/pods/x/.."),
        "pods/relative".into(),
        "".into(),
        format!("{kd}/pods/a\0b"),
        format!("{kd}/pods/{}", "x".repeat(4097)),
        format!("{kd}/pods/%2e%2e/%2e%2e/x"),
        "/".into(),
        "/etc".into(),
        kd,
    ]
}

async fn strings_node_paths(s: &mut Suite) {
    let case = "Node calls: staging, target and volume paths outside the kubelet dir or malformed";
    let id = s.create(Kind::Dir, "paths").await;
    let good = s.stage_publish(&id).await;
    let mut n = s.node().await;
    for p in hostile_paths(s) {
        let w = show(&p);
        // %2e is a name, not a dot: accepted as a fresh directory would be, so skip it for
        // stage/publish; everything else is refused.
        let literal = p.contains("%2e");
        let stage = Mounted {
            id: id.clone(),
            staging: PathBuf::from(&p),
            target: good.target.clone(),
        };
        if !literal {
            expect(
                &format!("stage at {w}"),
                Code::InvalidArgument,
                n.node_stage_volume(stage_req(&stage, &[])),
            )
            .await
            .ok();
            let publish = Mounted {
                id: id.clone(),
                staging: good.staging.clone(),
                target: PathBuf::from(&p),
            };
            expect(
                &format!("publish at {w}"),
                Code::InvalidArgument,
                n.node_publish_volume(publish_req(&publish, &[])),
            )
            .await
            .ok();
        }
        let r = s.stats(&id, Path::new(&p)).await;
        assert!(
            matches!(code_of(&r), Code::InvalidArgument | Code::NotFound),
            "{case}: stats at {w}: {r:?}"
        );
        let r = call(
            "unpublish",
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: p.clone(),
            }),
        )
        .await;
        assert!(
            matches!(
                code_of(&r),
                Code::InvalidArgument | Code::Ok | Code::NotFound
            ),
            "{case}: unpublish at {w}: {r:?}"
        );
        let r = call(
            "unstage",
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: p.clone(),
            }),
        )
        .await;
        assert!(
            matches!(
                code_of(&r),
                Code::InvalidArgument | Code::Ok | Code::NotFound | Code::FailedPrecondition
            ),
            "{case}: unstage at {w}: {r:?}"
        );
        assert_eq!(
            mount_count(&good.target),
            1,
            "{case}: {w} unmounted the target"
        );
        assert_eq!(
            mount_count(&good.staging),
            1,
            "{case}: {w} unmounted the staging"
        );
        assert!(
            mount_count(Path::new("/etc")) == 0,
            "{case}: mounted on /etc"
        );
        s.sentinel.check(&format!("{case}: {w}"));
    }
    s.unpublish_unstage(&good).await;
    s.delete(&id).await.unwrap();
    s.done(case).await;
}

async fn strings_node_contexts(s: &mut Suite) {
    let case = "NodeStage and NodePublish: hostile volume_context and publish_context";
    let id = s.create(Kind::Dir, "contexts").await;
    let vol_ino = std::fs::metadata(s.data(Kind::Dir, &id)).unwrap().ino();
    let base = s.h().kubelet().join("pods/contexts");
    std::fs::create_dir_all(&base).unwrap();
    let m = Mounted {
        id: id.clone(),
        staging: base.join("staging"),
        target: base.join("target"),
    };
    let mut n = s.node().await;
    let sent = s.sentinel.path().display().to_string();
    let maps: Vec<HashMap<String, String>> = vec![
        [("subPath".to_string(), "../../../..".to_string())].into(),
        [("subPath".to_string(), sent.clone())].into(),
        [("path".to_string(), sent.clone())].into(),
        [("../../x".to_string(), "y".to_string())].into(),
    ];
    for ctx in &maps {
        for publish_ctx in [false, true] {
            let mut st = stage_req(&m, &[]);
            let mut pb = publish_req(&m, &[]);
            if publish_ctx {
                st.publish_context = ctx.clone();
                pb.publish_context = ctx.clone();
            } else {
                st.volume_context = ctx.clone();
                pb.volume_context = ctx.clone();
            }
            // Either refused, or ignored: then what is mounted is the volume itself.
            let r = call("stage with a context", n.node_stage_volume(st)).await;
            assert!(
                matches!(code_of(&r), Code::Ok | Code::InvalidArgument),
                "{case}: {r:?}"
            );
            if r.is_ok() {
                assert_eq!(
                    std::fs::metadata(&m.staging).unwrap().ino(),
                    vol_ino,
                    "{case}: staged"
                );
                let r = call("publish with a context", n.node_publish_volume(pb)).await;
                assert!(
                    matches!(code_of(&r), Code::Ok | Code::InvalidArgument),
                    "{case}: {r:?}"
                );
                if r.is_ok() {
                    assert_eq!(
                        std::fs::metadata(&m.target).unwrap().ino(),
                        vol_ino,
                        "{case}: published"
                    );
                }
                s.unpublish_unstage(&m).await;
            }
            s.sentinel.check(case);
        }
    }
    for bad in [
        big_map(),
        [("k".to_string(), "\0".to_string())].into(),
        [("x".repeat(200), "v".to_string())].into(),
    ] {
        let mut st = stage_req(&m, &[]);
        st.volume_context = bad.clone();
        expect(
            "stage with a malformed context",
            Code::InvalidArgument,
            n.node_stage_volume(st),
        )
        .await
        .ok();
        let mut st = stage_req(&m, &[]);
        st.publish_context = bad;
        expect(
            "stage with a malformed publish context",
            Code::InvalidArgument,
            n.node_stage_volume(st),
        )
        .await
        .ok();
    }
    s.delete(&id).await.unwrap();
    std::fs::remove_dir_all(&base).unwrap();
    s.done(case).await;
}

// ---------------------------------------------------------------------------------------
// Cases: mount flags.

/// Refused flags. A comma-separated list of allowed flags (`"ro,noatime"`, `" ro"`) is
/// accepted on purpose — every part is checked against the allow-list — so only lists with
/// a part outside it are here.
const BAD_FLAGS: &[&str] = &[
    "exec",
    "suid",
    "dev",
    "bind",
    "rbind",
    "remount",
    "rw,suid",
    "nosuid,dev",
    "uid=0",
    "context=system_u:object_r:etc_t:s0",
    "defaults",
    " exec",
    "ro,exec",
    "ro\0",
    "ro,,suid",
    "mand",
    "shared",
];

async fn mount_flags_outside_the_allow_list(s: &mut Suite) {
    let case = "mount flags outside the allow-list at stage, publish, create and validate";
    let id = s.create(Kind::Dir, "flags").await;
    let base = s.h().kubelet().join("pods/flags");
    std::fs::create_dir_all(&base).unwrap();
    let mut m = Mounted {
        id: id.clone(),
        staging: base.join("staging"),
        target: base.join("target"),
    };
    let mut n = s.node().await;
    let mut c = s.controller().await;
    for flag in BAD_FLAGS {
        expect(
            &format!("stage with {flag:?}"),
            Code::InvalidArgument,
            n.node_stage_volume(stage_req(&m, &[flag])),
        )
        .await
        .ok();
        assert_eq!(mount_count(&m.staging), 0, "{case}: staged with {flag:?}");
        let mut req = create_req("hostile-flags", 1 << 20);
        req.volume_capabilities = vec![mount_cap_flags(Mode::SingleNodeWriter, &[flag])];
        expect(
            &format!("create with {flag:?}"),
            Code::InvalidArgument,
            c.create_volume(req),
        )
        .await
        .ok();
        let r = call(
            "validate",
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![mount_cap_flags(Mode::SingleNodeWriter, &[flag])],
                ..Default::default()
            }),
        )
        .await;
        match r {
            Ok(r) => assert!(r.confirmed.is_none(), "{case}: {flag:?} confirmed"),
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{case}: {flag:?}: {e:?}"),
        }
    }
    call("stage", n.node_stage_volume(stage_req(&m, &[])))
        .await
        .unwrap();
    for flag in BAD_FLAGS {
        expect(
            &format!("publish with {flag:?}"),
            Code::InvalidArgument,
            n.node_publish_volume(publish_req(&m, &[flag])),
        )
        .await
        .ok();
        assert_eq!(mount_count(&m.target), 0, "{case}: published with {flag:?}");
    }
    // The allowed flags still work, and the mount stays nosuid,nodev whatever was asked.
    m.target = base.join("target-ok");
    call(
        "publish with allowed flags",
        n.node_publish_volume(publish_req(&m, &["noexec", "noatime", "rw"])),
    )
    .await
    .unwrap();
    let opts = mount_options(&m.target).unwrap();
    for want in ["nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|o| o == want), "{case}: {opts}");
    }
    s.unpublish_unstage(&m).await;
    s.delete(&id).await.unwrap();
    std::fs::remove_dir_all(&base).unwrap();
    s.done(case).await;
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_suite() {
    if !root_or_skip("hostile_suite") {
        return;
    }
    let started = Instant::now();
    let mut s = Suite::start().await;
    s.sentinel.check("start");
    tokio::time::timeout(Duration::from_secs(600), async {
        // Symlinks.
        for kind in [Kind::Dir, Kind::Btrfs] {
            delete_through_symlink_chains(&mut s, kind).await;
        }
        stats_through_symlink_chains(&mut s).await;
        for kind in [Kind::Dir, Kind::Image, Kind::Btrfs] {
            snapshot_restore_clone_keep_symlinks(&mut s, kind).await;
        }
        co_paths_that_are_symlinks_to_the_sentinel(&mut s).await;
        // Races.
        for kind in [Kind::Dir, Kind::Btrfs] {
            race_delete(&mut s, kind).await;
        }
        race_snapshot(&mut s).await;
        race_stats(&mut s).await;
        // Special files.
        for kind in [Kind::Dir, Kind::Btrfs] {
            specials_delete(&mut s, kind).await;
        }
        for kind in [Kind::Dir, Kind::Image] {
            specials_stats_and_nodev(&mut s, kind).await;
        }
        for kind in [Kind::Dir, Kind::Image, Kind::Btrfs] {
            specials_snapshot_restore(&mut s, kind).await;
        }
        // Hard links.
        hard_link_to_the_sentinel(&mut s).await;
        hard_link_across_filesystems(&mut s).await;
        // Bind mounts.
        for kind in [Kind::Dir, Kind::Btrfs] {
            bind_mount_before_delete(&mut s, kind).await;
            bind_mount_before_snapshot(&mut s, kind).await;
        }
        // Strings.
        strings_create_volume(&mut s).await;
        strings_volume_ids(&mut s).await;
        strings_validate_contexts(&mut s).await;
        strings_snapshots(&mut s).await;
        strings_listings(&mut s).await;
        strings_node_ids(&mut s).await;
        strings_node_paths(&mut s).await;
        strings_node_contexts(&mut s).await;
        // Mount flags.
        mount_flags_outside_the_allow_list(&mut s).await;
    })
    .await
    .expect("the hostile suite took over 600 s");
    loud!(
        "hostile: {} cases, host untouched after each ({} skipped) in {:.1} s",
        s.cases.len(),
        s.skipped.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        s.cases.len() + s.skipped.len() >= 25,
        "the suite ran fewer cases than it should"
    );
}
