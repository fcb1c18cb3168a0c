//! Project quotas on a real kernel: on an ext4 (formatted with `-O quota,project`, mounted
//! `prjquota`) and an xfs (mounted `pquota`) filesystem built on a loop-mounted image file,
//! a `dir` pool's volume says `capacityEnforcement=hard` in its context; a write past its
//! size fails; NodeGetVolumeStats reports the quota's own counters; expansion raises the
//! enforced limit; deletion lifts it. Where the kernel or the tools cannot provide project
//! quotas, the test says exactly why it skipped (the quota logic itself is covered through
//! the syscall seam in stowage-driver); `scripts/vm-test` runs it on Debian kernels that
//! have them.
//!
//! The writes come from a thread without CAP_SYS_RESOURCE, as a pod's processes have it:
//! the kernel's generic quota code (ext4's) lets a holder of that capability past any hard
//! limit, while xfs enforces project limits on everyone.

#[macro_use]
mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_sys::{Kernel, LinuxKernel, QuotaUsage};

const MIB: u64 = 1 << 20;

/// A filesystem on a loop-mounted image, unmounted (and the loop device freed) on drop.
struct LoopFs {
    mountpoint: PathBuf,
    mounted: bool,
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            for m in mounts_under(&self.mountpoint) {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn make_fs(dir: &Path, fs: &str) -> Result<LoopFs, String> {
    let image = dir.join(format!("{fs}.img"));
    let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
    f.set_len(512 << 20).map_err(|e| e.to_string())?;
    drop(f);
    let option = match fs {
        "ext4" => {
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "quota,project"])
                .arg(&image))?;
            "loop,prjquota"
        }
        "xfs" => {
            run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&image))?;
            "loop,pquota"
        }
        _ => unreachable!(),
    };
    let mountpoint = dir.join(format!("{fs}-mnt"));
    std::fs::create_dir_all(&mountpoint).map_err(|e| e.to_string())?;
    let mut lfs = LoopFs {
        mountpoint,
        mounted: false,
    };
    run(Command::new("mount")
        .args(["-o", option])
        .arg(&image)
        .arg(&lfs.mountpoint))?;
    lfs.mounted = true;
    Ok(lfs)
}

/// What a write past a project's hard limit fails with: EDQUOT from the generic quota code
/// (ext4); xfs answers ENOSPC for a project (a directory tree under a project limit looks
/// like a smaller filesystem), EDQUOT only for user and group limits.
fn over_limit_errno(fs: &str) -> i32 {
    if fs == "xfs" {
        28 // ENOSPC
    } else {
        122 // EDQUOT
    }
}

/// Appends up to `max_mib` MiB to `path`, a MiB and an fsync at a time, from a thread
/// without CAP_SYS_RESOURCE (capabilities are per thread on Linux, so the rest of the test
/// keeps it). Returns the file's size after and the error that stopped it, if any.
fn fill_unprivileged(path: &Path, max_mib: u64) -> (u64, Option<std::io::Error>) {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let mut caps = capabilities(None).expect("capget");
        caps.effective.remove(CapabilitySet::SYS_RESOURCE);
        set_capabilities(None, caps).expect("capset");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![0xabu8; MIB as usize];
        let mut err = None;
        for _ in 0..max_mib {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                err = Some(e);
                break;
            }
        }
        (f.metadata().unwrap().len(), err)
    })
    .join()
    .unwrap()
}

/// The quota's counters and limit of the project of directory `dir`, read from the kernel.
fn counters(pool: &Path, dir: &Path) -> (u32, QuotaUsage) {
    let d = stowage_sys::fs::open_trusted_dir(dir).unwrap();
    let project = LinuxKernel.project_id(d.as_fd()).unwrap();
    (project, project_counters(pool, project))
}

fn project_counters(pool: &Path, project: u32) -> QuotaUsage {
    let fs = stowage_sys::fs::open_trusted_dir(pool).unwrap();
    LinuxKernel.project_usage(fs.as_fd(), project).unwrap()
}

fn bytes_usage(s: &csi::NodeGetVolumeStatsResponse) -> csi::VolumeUsage {
    s.usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .cloned()
        .expect("bytes usage")
}

async fn quota_enforced_on(fs: &str) {
    let test = format!("quota_enforced_on_{fs}");
    if !root_or_skip(&test) {
        return;
    }
    let tool = if fs == "ext4" {
        "mkfs.ext4"
    } else {
        "mkfs.xfs"
    };
    if Command::new(tool).arg("-V").output().is_err() {
        loud!("SKIPPED ({tool} is not installed; .ci/run installs it): {test}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = match make_fs(dir.path(), fs) {
        Ok(l) => l,
        Err(why) => {
            loud!("SKIPPED (this kernel cannot mount {fs} with project quotas: {why}): {test}");
            return;
        }
    };
    let pool = lfs.mountpoint.join("pool");
    let cfg = dir.path().join("stowage.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[pool]]\nname = \"q\"\nkind = \"dir\"\npath = \"{}\"\n",
            pool.display()
        ),
    )
    .unwrap();
    let h = Harness::start(&["--config", cfg.to_str().unwrap()]).await;
    let mut c = h.controller().await;
    let v = create_volume(&mut c, "capped", 4 << 20).await;
    if v.volume_context
        .get("capacityEnforcement")
        .map(String::as_str)
        != Some("hard")
    {
        loud!(
            "SKIPPED (project quotas not enforced on {fs} here: {:?}): {test}",
            v.volume_context
        );
        return;
    }
    let id = v.volume_id.clone();
    let vdir = pool.join("volumes").join(&id);
    let (project, q) = counters(&pool, &vdir);
    assert_ne!(project, 0, "the volume's directory carries no project");
    assert_eq!(q.bytes_limit, 4 * MIB, "{q:?}");

    // Published as a pod sees it; the write past the size fails.
    let staging = h.kubelet().join("staging");
    let target = h.kubelet().join("pod/volume");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let mut n = h.node().await;
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();
    let (written, err) = fill_unprivileged(&target.join("fill"), 8);
    let err = err.expect("writing 8 MiB into a 4 MiB volume succeeded");
    assert_eq!(
        err.raw_os_error(),
        Some(over_limit_errno(fs)),
        "a write past the limit on {fs}: {err}"
    );
    assert!(
        (3 * MIB..=4 * MIB).contains(&written),
        "{written} bytes written under a 4 MiB limit"
    );

    // Usage is the quota's counters, not a walk of the tree.
    let stats_req = || csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        staging_target_path: String::new(),
    };
    let s = n
        .node_get_volume_stats(stats_req())
        .await
        .unwrap()
        .into_inner();
    let bytes = bytes_usage(&s);
    let q = project_counters(&pool, project);
    assert_eq!(bytes.used as u64, q.bytes_used, "{bytes:?} {q:?}");
    assert!(q.bytes_used >= written, "{q:?}, {written} bytes written");
    assert_eq!(bytes.total as u64, 4 * MIB, "{bytes:?}");
    assert_eq!(bytes.available, bytes.total - bytes.used, "{bytes:?}");

    // Expansion raises the enforced limit: the volume takes about 4 MiB more, then stops.
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 8 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 8 << 20);
    assert_eq!(project_counters(&pool, project).bytes_limit, 8 * MIB);
    let (more, err) = fill_unprivileged(&target.join("more"), 8);
    let err = err.expect("writing 8 MiB more into an 8 MiB volume succeeded");
    assert_eq!(err.raw_os_error(), Some(over_limit_errno(fs)), "{err}");
    assert!(
        (3 * MIB..=4 * MIB).contains(&more),
        "{more} bytes more after expanding from 4 to 8 MiB"
    );
    let s = n
        .node_get_volume_stats(stats_req())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bytes_usage(&s).total, 8 << 20);

    // Deletion lifts the limit: nothing of the project is charged or limited afterwards.
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
        secrets: Default::default(),
    })
    .await
    .unwrap();
    assert!(!vdir.exists());
    let q = project_counters(&pool, project);
    assert_eq!((q.bytes_limit, q.bytes_used), (0, 0), "{q:?}");
    // A directory put in the old project takes more than the old limit.
    let other = lfs.mountpoint.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = stowage_sys::fs::open_trusted_dir(&other).unwrap();
    LinuxKernel.set_project_id(d.as_fd(), project).unwrap();
    let (free, err) = fill_unprivileged(&other.join("fill"), 10);
    assert!(err.is_none(), "{err:?} after {free} bytes");
    std::fs::remove_dir_all(&other).unwrap();
}

#[tokio::test]
async fn quota_enforced_on_ext4() {
    bounded(quota_enforced_on("ext4")).await
}

#[tokio::test]
async fn quota_enforced_on_xfs() {
    bounded(quota_enforced_on("xfs")).await
}
