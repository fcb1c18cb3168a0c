//! The `btrfs` pool over the real socket, on a btrfs made with mkfs.btrfs in an image file
//! and loop-mounted: the limit enforced (EDQUOT), stats, deletion of a volume holding nested
//! subvolumes, symlinks to host paths and a bind mount (the host untouched), restart with
//! volumes published, online expansion under an open file, and a crash at each backend step
//! of create and delete. Root only;
//! SKIPPED (saying why) without mkfs.btrfs or a loop mount.

#[macro_use]
mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_sys::{Kernel, LinuxKernel};

const EDQUOT: i32 = 122;

/// A btrfs on a loop-mounted image; unmounted on drop (the loop device goes with it: mount
/// sets autoclear), also when the test fails.
struct BtrfsFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Drop for BtrfsFs {
    fn drop(&mut self) {
        for m in mounts_under(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

fn btrfs_or_skip(test: &str) -> Option<BtrfsFs> {
    if !root_or_skip(test) {
        return None;
    }
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        loud!("SKIPPED (mkfs.btrfs is not installed: btrfs-progs; .ci/run installs it): {test}");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("stowage-btrfs-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("btrfs.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(512 << 20))
        .unwrap();
    let mkfs = Command::new("mkfs.btrfs")
        .args(["-q", "-f"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "mkfs.btrfs: {mkfs:?}");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fs = BtrfsFs { _dir: dir, mnt };
    let out = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&fs.mnt)
        .output()
        .unwrap();
    if !out.status.success() {
        loud!(
            "SKIPPED (this kernel cannot loop-mount btrfs: {}): {test}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(fs)
}

async fn start(fs: &BtrfsFs) -> Harness {
    let cfg = fs.mnt.join("stowage.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[pool]]\nname = \"sub\"\nkind = \"btrfs\"\npath = \"{}\"\n",
            fs.mnt.join("pool").display()
        ),
    )
    .unwrap();
    Harness::start(&["--config", cfg.to_str().unwrap()]).await
}

fn volume_dir(fs: &BtrfsFs, id: &str) -> PathBuf {
    fs.mnt.join("pool/volumes").join(id)
}

/// Writes 1 MiB chunks into `path` until a write fails or `max` MiB went in; the error.
fn fill(path: &Path, max: usize) -> Option<std::io::Error> {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..max {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            return Some(e);
        }
    }
    None
}

/// Commits the filesystem so qgroup counters are current.
fn sync_fs(path: &Path) {
    let fd = stowage_sys::fs::open_trusted_dir(path).unwrap();
    LinuxKernel.btrfs_commit(fd.as_fd()).unwrap();
}

fn qgroups(fs: &BtrfsFs) -> Vec<stowage_sys::Qgroup> {
    let fd = stowage_sys::fs::open_trusted_dir(&fs.mnt).unwrap();
    LinuxKernel.btrfs_qgroups(fd.as_fd()).unwrap()
}

fn subvolume_id(path: &Path) -> u64 {
    let fd = stowage_sys::fs::open_trusted_dir(path).unwrap();
    LinuxKernel.btrfs_subvolume_id(fd.as_fd()).unwrap()
}

struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

fn paths(h: &Harness, name: &str) -> Paths {
    let base = h.kubelet().join("pods").join(name);
    std::fs::create_dir_all(&base).unwrap();
    Paths {
        staging: base.join("staging"),
        target: base.join("target"),
    }
}

async fn stage_and_publish(h: &Harness, id: &str, p: &Paths) {
    let mut n = h.node().await;
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: p.staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: p.staging.display().to_string(),
        target_path: p.target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn unpublish_and_unstage(h: &Harness, id: &str, p: &Paths) {
    let mut n = h.node().await;
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.to_owned(),
        target_path: p.target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: p.staging.display().to_string(),
    })
    .await
    .unwrap();
}

async fn delete(h: &Harness, id: &str) -> Result<(), tonic::Status> {
    h.controller()
        .await
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            secrets: Default::default(),
        })
        .await
        .map(|_| ())
}

async fn stats(h: &Harness, id: &str, path: &Path) -> csi::NodeGetVolumeStatsResponse {
    h.node()
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_stats_and_deletion_of_a_hostile_volume() {
    let test = "limit_stats_and_deletion_of_a_hostile_volume";
    let Some(fs) = btrfs_or_skip(test) else {
        return;
    };
    bounded(async {
        let h = start(&fs).await;
        assert!(
            h.log_text().contains("pool capacity is enforced"),
            "{}",
            h.log_text()
        );
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "capped", 8 << 20).await;
        assert_eq!(v.volume_context["capacityEnforcement"], "hard");
        assert_eq!(v.volume_context["pool"], "sub");
        let id = v.volume_id.clone();
        let p = paths(&h, "pod-a");
        stage_and_publish(&h, &id, &p).await;

        // The limit, as the pod sees it through its publication.
        let err = fill(&p.target.join("fill"), 16).expect("16 MiB fit into an 8 MiB volume");
        assert_eq!(err.raw_os_error(), Some(EDQUOT), "{err}");
        sync_fs(&fs.mnt);
        let s = stats(&h, &id, &p.target).await;
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
            .expect("bytes usage");
        assert_eq!(bytes.total, 8 << 20);
        assert!(bytes.used >= 4 << 20 && bytes.used <= 8 << 20, "{bytes:?}");
        assert_eq!(bytes.available, bytes.total - bytes.used);
        assert!(!s.volume_condition.expect("condition").abnormal);

        // In use: deletion refused, nothing lost.
        assert_eq!(
            code(
                c.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: Default::default(),
                })
                .await
            ),
            tonic::Code::FailedPrecondition
        );
        unpublish_and_unstage(&h, &id, &p).await;

        // What a pod could leave behind: nested subvolumes (one inside a directory, one
        // inside another), symlinks to host paths, and a bind mount of a host directory.
        std::fs::remove_file(volume_dir(&fs, &id).join("fill")).unwrap();
        sync_fs(&fs.mnt);
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("precious"), b"keep").unwrap();
        let vdir = volume_dir(&fs, &id);
        let root = stowage_sys::fs::open_trusted_dir(&vdir).unwrap();
        LinuxKernel
            .btrfs_create_subvolume(root.as_fd(), "nested")
            .unwrap();
        std::fs::create_dir(vdir.join("d")).unwrap();
        let d = stowage_sys::fs::open_trusted_dir(&vdir.join("d")).unwrap();
        LinuxKernel
            .btrfs_create_subvolume(d.as_fd(), "deep")
            .unwrap();
        let nested = stowage_sys::fs::open_trusted_dir(&vdir.join("nested")).unwrap();
        LinuxKernel
            .btrfs_create_subvolume(nested.as_fd(), "inner")
            .unwrap();
        drop((root, d, nested));
        std::fs::write(vdir.join("nested/inner/data"), b"x").unwrap();
        std::os::unix::fs::symlink(host.path(), vdir.join("host-link")).unwrap();
        std::os::unix::fs::symlink(host.path(), vdir.join("nested/host-link")).unwrap();
        std::fs::create_dir(vdir.join("d/mnt")).unwrap();
        let bind = Command::new("mount")
            .arg("--bind")
            .arg(host.path())
            .arg(vdir.join("d/mnt"))
            .status()
            .unwrap();
        assert!(bind.success());
        let before = qgroups(&fs).len();

        let err = delete(&h, &id).await.expect_err("a mount inside");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("d/mnt"), "{}", err.message());
        assert!(vdir.join("nested/inner/data").exists());
        let umount = Command::new("umount")
            .arg(vdir.join("d/mnt"))
            .status()
            .unwrap();
        assert!(umount.success());

        delete(&h, &id).await.unwrap();
        assert!(!vdir.exists());
        assert_eq!(
            std::fs::read(host.path().join("precious")).unwrap(),
            b"keep",
            "the host directory was touched"
        );
        delete(&h, &id).await.unwrap();

        // The qgroups of the four destroyed subvolumes go (the kernel drops what it could not
        // remove at once when its cleaner has dropped the subvolume).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            sync_fs(&fs.mnt);
            let now = qgroups(&fs).len();
            if now + 4 <= before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "qgroups pile up: {before} before deletion, {now} after 60 s: {:?}",
                qgroups(&fs)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_with_published_volumes_and_crashes_at_each_backend_step() {
    let test = "restart_with_published_volumes_and_crashes_at_each_backend_step";
    let Some(fs) = btrfs_or_skip(test) else {
        return;
    };
    bounded(async {
        let mut h = start(&fs).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "kept", 4 << 20).await;
        let p = paths(&h, "pod-b");
        stage_and_publish(&h, &v.volume_id, &p).await;
        std::fs::write(p.target.join("before"), b"data").unwrap();
        h.stop();
        h.spawn().await;
        // Still mounted, still ours, still limited.
        assert_eq!(std::fs::read(p.target.join("before")).unwrap(), b"data");
        let err = fill(&p.target.join("fill"), 8).expect("8 MiB fit into 4 MiB");
        assert_eq!(err.raw_os_error(), Some(EDQUOT));
        let s = stats(&h, &v.volume_id, &p.target).await;
        assert!(!s.volume_condition.expect("condition").abnormal);
        unpublish_and_unstage(&h, &v.volume_id, &p).await;
        delete(&h, &v.volume_id).await.unwrap();

        // A crash between subvolume create and qgroup limit: the restart finishes the create,
        // and the retried CreateVolume answers the same volume, limited.
        h.stop();
        h.env = vec![(
            "STOWAGE_TEST_CRASH_AT".to_owned(),
            "btrfs-create-after-subvolume".to_owned(),
        )];
        h.spawn().await;
        let mut c = h.controller().await;
        assert_ne!(
            code(c.create_volume(create_req("crashy", 4 << 20)).await),
            tonic::Code::Ok
        );
        assert!(h.await_crash(), "no abort at btrfs-create-after-subvolume");
        h.env.clear();
        h.spawn().await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "crashy", 4 << 20).await;
        let sid = subvolume_id(&volume_dir(&fs, &v.volume_id));
        let q = qgroups(&fs)
            .into_iter()
            .find(|q| q.id == sid)
            .expect("qgroup of the volume");
        assert_eq!(q.max_referenced, Some(4 << 20));

        // A crash between destroy and record: the restart forgets the volume; a retried
        // delete is OK.
        h.stop();
        h.env = vec![(
            "STOWAGE_TEST_CRASH_AT".to_owned(),
            "btrfs-delete-after-destroy".to_owned(),
        )];
        h.spawn().await;
        assert_ne!(delete(&h, &v.volume_id).await.err().map(|s| s.code()), None);
        assert!(h.await_crash(), "no abort at btrfs-delete-after-destroy");
        h.env.clear();
        h.spawn().await;
        assert!(!volume_dir(&fs, &v.volume_id).exists());
        delete(&h, &v.volume_id).await.unwrap();
        let listed = h
            .controller()
            .await
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.entries.is_empty(), "{listed:?}");
    })
    .await;
}

/// Online expansion: a pod's writer fills its volume to the limit (EDQUOT), the controller
/// raises the limit (no node step), and the same open file takes more data; a smaller request
/// afterwards changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn expansion_while_a_file_is_open() {
    let test = "expansion_while_a_file_is_open";
    let Some(fs) = btrfs_or_skip(test) else {
        return;
    };
    bounded(async {
        let h = start(&fs).await;
        let mut c = h.controller().await;
        let id = create_volume(&mut c, "growing", 8 << 20).await.volume_id;
        let p = paths(&h, "pod-grow");
        stage_and_publish(&h, &id, &p).await;

        let mut file = std::fs::File::create(p.target.join("log")).unwrap();
        let chunk = vec![0x42u8; 1 << 20];
        let mut written = 0usize;
        let full = loop {
            match file.write_all(&chunk).and_then(|()| file.sync_all()) {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 16, "16 MiB went into an 8 MiB volume");
        };
        assert_eq!(full.raw_os_error(), Some(EDQUOT), "{full}");

        let expand = |bytes: i64| csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let grown = c
            .controller_expand_volume(expand(32 << 20))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grown.capacity_bytes, 32 << 20);
        assert!(
            !grown.node_expansion_required,
            "a qgroup limit needs no node step"
        );
        // The same open file takes what did not fit before.
        for _ in 0..8 {
            file.write_all(&chunk)
                .and_then(|()| file.sync_all())
                .unwrap();
        }
        sync_fs(&fs.mnt);
        let s = stats(&h, &id, &p.target).await;
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
            .expect("bytes usage");
        assert_eq!(bytes.total, 32 << 20);
        assert!(bytes.used >= (written as i64 + 8) << 20, "{bytes:?}");

        // Never shrinks: a smaller request answers the current size.
        let again = c
            .controller_expand_volume(expand(16 << 20))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.capacity_bytes, 32 << 20);
        drop(file);
        unpublish_and_unstage(&h, &id, &p).await;
        delete(&h, &id).await.unwrap();
    })
    .await;
}
